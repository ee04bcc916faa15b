"""The composition root: builds the gateway's apps from a :class:`Config`.

Nothing else in the package constructs long-lived components; they receive
what they need from here. App state goes through ``web.AppKey`` and every
resource that needs the event loop is opened and closed in ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from llmproxy.admin.api import build_admin_app
from llmproxy.config.schema import Config
from llmproxy.gateway import Gateway
from llmproxy.keys import GATEWAY

log = logging.getLogger(__name__)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.ready:
        return web.json_response({"status": "ready"})
    why = "draining" if gw.draining else "no route has a healthy backend"
    return web.json_response({"status": "not ready", "reason": why}, status=503)


def build_app(gateway: Gateway) -> web.Application:
    # No middleware: Gateway.proxy is the isolation boundary of the hot path,
    # and the probes cannot fail.
    app = web.Application(
        client_max_size=gateway.config.server.max_body_bytes,
        handler_args={"max_field_size": 65536},
    )
    app[GATEWAY] = gateway

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    async def drain(app: web.Application) -> None:
        # aiohttp has stopped accepting connections; give in-flight requests
        # their drain timeout before it cancels what is left.
        await gateway.drain_requests(gateway.config.server.drain_timeout_s)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_route("*", "/{tail:.*}", gateway.proxy)
    return app


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the gateway ended up listening (ports may have been 0)."""

    url: str
    admin_url: str | None


def _bound_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def serve(
    config: Config,
    *,
    on_listening: Callable[[Listening], None] | None = None,
    stop: asyncio.Event | None = None,
    reuse_port: bool = False,
) -> None:
    """Run the gateway until ``stop`` is set or SIGTERM/SIGINT arrives.

    ``reuse_port``: this process is one of several workers on the same port.
    """
    gateway = Gateway(config)
    runner = web.AppRunner(
        build_app(gateway),
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,
        # Our own drain (on_shutdown) has already ended every request by then.
        shutdown_timeout=5.0,
    )
    await runner.setup()
    srv = config.server
    await web.TCPSite(runner, srv.host, srv.port, backlog=4096, reuse_port=reuse_port).start()
    admin_runner: web.AppRunner | None = None
    if config.admin.enabled:
        admin_runner = web.AppRunner(build_admin_app(gateway), access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
    listening = Listening(_bound_url(runner), _bound_url(admin_runner) if admin_runner else None)
    _tune_gc()
    log.info("listening on %s (admin: %s)", listening.url, listening.admin_url)
    if on_listening is not None:
        on_listening(listening)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[object]] = set()

    def on_sighup() -> None:
        task = loop.create_task(gateway.reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("shutting down: draining for up to %.0fs", srv.drain_timeout_s)
        gateway.draining = True
        await runner.cleanup()
        for task in list(reloads):
            task.cancel()
        if admin_runner is not None:
            await admin_runner.cleanup()


def _tune_gc() -> None:
    """Once started: keep the collector off what start-up built, and run it less.

    ``gc.freeze()`` moves every object alive now (modules, config, metrics,
    aiohttp's machinery: most of the heap) to a generation the collector never
    scans, so a full collection no longer walks it: a pause of milliseconds
    in a stream's inter-token gap otherwise. Objects of a request die by
    reference counting; a higher first-generation threshold means fewer
    collections of the few that are in flight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_GEN0, 20, 20)


#: Container allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD_GEN0 = 20_000
