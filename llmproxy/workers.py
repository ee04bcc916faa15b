"""``server.workers: N``: N gateway processes on one port (SO_REUSEPORT).

The kernel spreads new connections over the workers' listening sockets. This
process (the supervisor) reserves the port, starts the workers, restarts one
that dies, forwards SIGHUP (reload) and SIGTERM (drain) to them, and serves
the admin listener for the whole gateway by asking every worker's own admin
listener (on an ephemeral loopback port) and merging the answers:

- counters and histograms are summed, so ``/metrics`` shows the whole gateway;
- ``llmproxy_backend_in_flight`` is summed; other backend gauges are per-worker
  views of the same backend (each worker health-checks on its own) and are
  merged conservatively: ``healthy``/``available`` by min, the rest by max;
- ``/admin/state`` is worker 0's view with in-flight counts summed, plus the
  list of workers; operator actions (drain, reload, weights) go to every worker.

Per process, not shared: least-connections counts (each worker balances its
own in-flight requests), breaker and outlier state, retry budgets, the
memory rate-limit store (use ``store: redis://`` to share limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.admin.api import require_token
from llmproxy.admin.status_page import status_page_handler
from llmproxy.config import ConfigError, load_config
from llmproxy.config.schema import Config
from llmproxy.errors import error_middleware

log = logging.getLogger(__name__)

_MIN_GAUGES = frozenset({"llmproxy_backend_healthy", "llmproxy_backend_available"})
_SUM_GAUGES = frozenset(
    {"llmproxy_backend_in_flight", "llmproxy_pool_in_flight", "llmproxy_pool_desired_replicas"}
)


@dataclass(slots=True)
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    admin_url: str | None = None
    restarts: int = 0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket so port 0 becomes one real port
    that every worker then binds too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(config.server.workers)]
        self.port = 0
        self.stopping = False
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- workers -------------------------------------------------------------

    async def _spawn(self, w: Worker) -> None:
        args = [
            sys.executable, "-m", "llmproxy", "serve", "--config", self.config_path,
            "--worker-index", str(w.index), "--port", str(self.port),
        ]  # fmt: skip
        w.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        assert w.proc.stdout is not None
        while line := (await w.proc.stdout.readline()).decode():
            if "listening on" in line:
                w.admin_url = line.split("(admin: ", 1)[1].split(")")[0]
                break
        if w.admin_url is None:
            raise RuntimeError(f"worker {w.index} exited before listening")
        log.info("worker %d (pid %d) ready, admin %s", w.index, w.proc.pid, w.admin_url)
        task = asyncio.create_task(self._watch(w), name=f"worker:{w.index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, w: Worker) -> None:
        assert w.proc is not None
        assert w.proc.stdout is not None
        while await w.proc.stdout.readline():
            pass  # keep the pipe drained
        code = await w.proc.wait()
        if self.stopping:
            return
        w.restarts += 1
        w.admin_url = None
        delay = min(10.0, 0.5 * w.restarts)
        log.error("worker %d exited with %s; restarting in %.1fs", w.index, code, delay)
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(w)

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _reload(self) -> None:
        """SIGHUP: every worker reloads; the supervisor re-reads the file too,
        for the admin token it checks (kept if the file is invalid)."""
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "reload: %s is invalid; workers keep their config:\n%s", self.config_path, exc
            )
        self.signal_all(signal.SIGHUP)

    # -- admin fan-out ---------------------------------------------------------

    async def _ask_all(
        self, method: str, path: str, token: str | None, body: bytes | None = None
    ) -> list[tuple[int, bytes]]:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body:
            headers["Content-Type"] = "application/json"

        async def one(url: str) -> tuple[int, bytes]:
            assert self._session is not None
            try:
                async with self._session.request(
                    method, url + path, headers=headers, data=body
                ) as r:
                    return r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # A worker that just died (and is being restarted) has no say.
                log.warning("worker admin %s did not answer: %s", url, exc)
                return 502, b""

        urls = [w.admin_url for w in self.workers if w.admin_url]
        return await asyncio.gather(*(one(u) for u in urls))

    async def _metrics(self, request: web.Request) -> web.Response:
        texts = [b.decode() for st, b in await self._ask_all("GET", "/metrics", None) if st == 200]
        return web.Response(
            text=merge_metrics(texts), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def _state(self, request: web.Request) -> web.Response:
        answers = await self._ask_all("GET", "/admin/state", self.config.admin.token)
        states = [json.loads(b) for st, b in answers if st == 200]
        if not states:
            return web.json_response({"error": "no worker answered"}, status=503)
        merged = merge_states(states)
        merged["workers"] = [
            {
                "index": w.index,
                "pid": w.proc.pid if w.proc else None,
                "admin_url": w.admin_url,
                "restarts": w.restarts,
            }
            for w in self.workers
        ]
        return web.json_response(merged)

    async def _fan_out(self, request: web.Request) -> web.Response:
        body = await request.read()
        answers = await self._ask_all(
            request.method, request.path_qs, self.config.admin.token, body or None
        )
        if not answers:
            return web.json_response({"error": "no worker answered"}, status=503)
        answered = [(st, b) for st, b in answers if b]
        if not answered:
            return web.json_response({"error": "no worker answered"}, status=503)
        status, first = answered[0]
        worst = max(st for st, _ in answered)
        return web.Response(body=first, status=max(status, worst), content_type="application/json")

    async def _ready(self, request: web.Request) -> web.Response:
        answers = await self._ask_all("GET", "/readyz", None)
        ready = any(st == 200 for st, _ in answers) and not self.stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    def admin_app(self) -> web.Application:
        guard = require_token(self.config.admin.token, lambda: self.config.admin.token)
        app = web.Application(middlewares=[error_middleware])

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app.router.add_get("/", status_page_handler)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/admin/state", guard(self._state))
        app.router.add_route("*", "/admin/{tail:.+}", guard(self._fan_out))
        return app

    # -- run -------------------------------------------------------------------

    async def run(self, on_listening: Callable[[str, str], None] | None = None) -> None:
        srv, adm = self.config.server, self.config.admin
        reservation = reserve_port(srv.host, srv.port)
        self.port = reservation.getsockname()[1]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        admin_runner = web.AppRunner(self.admin_app(), access_log=None)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(self._spawn(w) for w in self.workers))
            await admin_runner.setup()
            await web.TCPSite(admin_runner, adm.host, adm.port).start()
            host, aport = admin_runner.addresses[0][:2]
            url, admin_url = f"http://{srv.host}:{self.port}", f"http://{host}:{aport}"
            log.info("%d workers listening on %s (admin: %s)", len(self.workers), url, admin_url)
            if on_listening is not None:
                on_listening(url, admin_url)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            await stop.wait()
        finally:
            self.stopping = True
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.signal_all(signal.SIGTERM)
            for w in self.workers:
                if w.proc is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(w.proc.wait(), srv.drain_timeout_s + 10)
            self.signal_all(signal.SIGKILL)
            for t in list(self._tasks):
                t.cancel()
            await admin_runner.cleanup()
            await self._session.close()
            reservation.close()


def merge_metrics(texts: list[str]) -> str:
    """Sum the workers' samples (min/max for the per-worker backend views)."""
    order: list[str] = []
    meta: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in meta:
                order.append(fam.name)
                meta[fam.name] = (fam.type, fam.documentation)
                values[fam.name] = {}
            rule = _rule(fam.name, fam.type)
            acc = values[fam.name]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue  # creation times do not add up; not exposed merged
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in acc:
                    acc[key] = s.value
                else:
                    acc[key] = rule(acc[key], s.value)
    out = []
    for name in order:
        kind, doc = meta[name]
        shown = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {shown} {_escape_help(doc)}")
        out.append(f"# TYPE {shown} {kind}")
        for (sample, labels), value in values[name].items():
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            out.append(
                f"{sample}{{{label_text}}} {_fmt(value)}" if labels else f"{sample} {_fmt(value)}"
            )
    return "\n".join(out) + "\n"


def _rule(name: str, kind: str) -> Callable[[float, float], float]:
    if kind != "gauge" or name in _SUM_GAUGES:
        return lambda a, b: a + b
    if name in _MIN_GAUGES:
        return min
    return max


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Worker 0's view, with in-flight counts summed over every worker."""
    merged: dict[str, Any] = json.loads(json.dumps(states[0]))
    for other in states[1:]:
        for pool_name, pool in other.get("pools", {}).items():
            mine = merged["pools"].get(pool_name)
            if mine is None:
                continue
            by_name = {b["name"]: b for b in mine["backends"]}
            for b in pool["backends"]:
                if b["name"] in by_name:
                    by_name[b["name"]]["in_flight"] += b["in_flight"]
    merged["ready"] = any(s.get("ready") for s in states)
    return merged
