"""Command line: argument parsing and running; no gateway logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from llmproxy import __version__


def _install_uvloop() -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional at run time
    except ImportError:  # pragma: no cover - platforms without uvloop
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _run(coro: Coroutine[Any, Any, None]) -> int:
    _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_serve(ns: argparse.Namespace) -> int:
    from llmproxy.app import Listening, serve  # noqa: PLC0415 - keep `--help` fast
    from llmproxy.config import ConfigError, load_config  # noqa: PLC0415

    try:
        config = load_config(ns.config)
    except ConfigError as exc:
        print(f"llmproxy: invalid config {ns.config}:\n{exc}", file=sys.stderr)
        return 2

    def announce(where: Listening) -> None:
        print(f"llmproxy listening on {where.url} (admin: {where.admin_url})", flush=True)

    if ns.worker_index is not None:
        # One of server.workers processes: same port, private loopback admin.
        server = dataclasses.replace(config.server, port=ns.port)
        admin = dataclasses.replace(config.admin, host="127.0.0.1", port=0, enabled=True)
        config = dataclasses.replace(config, server=server, admin=admin)
        return _run(serve(config, on_listening=announce, reuse_port=True))
    if config.server.workers > 1:
        from llmproxy.workers import Supervisor  # noqa: PLC0415

        sup = Supervisor(config, ns.config)

        def announce_all(url: str, admin_url: str) -> None:
            print(f"llmproxy listening on {url} (admin: {admin_url})", flush=True)

        return _run(sup.run(on_listening=announce_all))
    return _run(serve(config, on_listening=announce))


def _cmd_check_config(ns: argparse.Namespace) -> int:
    from llmproxy.config import check_config  # noqa: PLC0415

    errors = check_config(ns.file)
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        print(f"{ns.file}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{ns.file}: OK")
    return 0


def _cmd_sim(ns: argparse.Namespace) -> int:
    from llmproxy import sim  # noqa: PLC0415

    return _run(sim.serve(sim.config_from_args(ns)))


def _cmd_hash_key(ns: argparse.Namespace) -> int:
    from llmproxy.policy.auth import hash_key_command  # noqa: PLC0415

    try:
        print(hash_key_command(ns.key, ns.name))
    except ValueError as exc:
        print(f"llmproxy: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from llmproxy.demo import run_demo  # noqa: PLC0415

    return _run(run_demo(host=ns.host, port=ns.port, admin_port=ns.admin_port))


def build_parser() -> argparse.ArgumentParser:
    from llmproxy import sim  # noqa: PLC0415
    from llmproxy.admin.status_cli import add_status_arguments, run_status  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="llmproxy", description="Resilient load-balancing reverse proxy for LLM inference."
    )
    parser.add_argument("--version", action="version", version=f"llmproxy {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", required=True, help="YAML config file")
    # Internal: set by the supervisor when server.workers > 1.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file; exit 1 on errors")
    p.add_argument("file")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("sim", help="run a simulated vLLM/TGI replica")
    sim.add_arguments(p)
    p.set_defaults(func=_cmd_sim)

    p = sub.add_parser("status", help="pools and backends from the admin API, like kubectl get")
    add_status_arguments(p)
    p.set_defaults(func=run_status)

    p = sub.add_parser("hash-key", help="make an API key (or hash one) for auth.keys")
    p.add_argument("key", nargs="?", default=None, help="an existing key; omitted: a new one")
    p.add_argument("--name", default="tenant", help="the key's name (tenant) in the config")
    p.set_defaults(func=_cmd_hash_key)

    p = sub.add_parser("demo", help="three simulated replicas and a gateway in front of them")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="gateway port (0: any free port)")
    p.add_argument("--admin-port", type=int, default=8081, help="admin port (0: any free port)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _setup_logging(ns.log_level)
    rc: int = ns.func(ns)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
