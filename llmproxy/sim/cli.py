"""Command line of the simulated replica: ``python -m llmproxy.sim --port N ...``.

The gateway's own CLI (``llmproxy sim``) reuses :func:`add_arguments` and
:func:`config_from_args`, so both accept the same flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from llmproxy.sim.app import serve
from llmproxy.sim.config import SimConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    add = parser.add_argument
    add("--host", default=d.host, help="address to listen on (default %(default)s)")
    add("--port", type=int, default=d.port, help="port; 0 picks a free one (default 0)")
    add("--model", default=d.model, help="served model name (default %(default)s)")
    add("--ttft-ms", type=float, default=d.ttft_ms, help="time to first token, ms")
    add("--tokens-per-s", type=float, default=d.tokens_per_s, help="decode speed; 0 = no delay")
    add("--max-concurrency", type=int, default=d.max_concurrency, help="0 = no cap")
    add("--max-tokens-default", type=int, default=d.max_tokens_default)
    add("--error-rate", type=float, default=d.error_rate, help="share of requests that fail")
    add("--error-status", type=int, default=d.error_status, help="status of injected errors")
    add("--hang", action="store_true", help="never answer generation requests")
    add("--slow-factor", type=float, default=d.slow_factor, help="multiplies all delays")
    add("--cut-after-tokens", type=int, default=None, help="close connections after N tokens")
    add("--unhealthy", action="store_true", help="/health answers 503")
    add("--seed", type=int, default=None, help="seed of the error-injection random source")


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    return SimConfig(
        host=ns.host,
        port=ns.port,
        model=ns.model,
        ttft_ms=ns.ttft_ms,
        tokens_per_s=ns.tokens_per_s,
        max_concurrency=ns.max_concurrency,
        max_tokens_default=ns.max_tokens_default,
        error_rate=ns.error_rate,
        error_status=ns.error_status,
        hang=ns.hang,
        slow_factor=ns.slow_factor,
        cut_after_tokens=ns.cut_after_tokens,
        unhealthy=ns.unhealthy,
        seed=ns.seed,
    )


async def _serve_until_signal(cfg: SimConfig) -> None:
    """``serve`` until SIGTERM or SIGINT, which end it cleanly."""
    serving = asyncio.ensure_future(serve(cfg))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (it is not built for every platform)."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy.sim",
        description="A simulated vLLM / TGI replica for testing llmproxy without a GPU.",
    )
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    run(_serve_until_signal(cfg))
    return 0
