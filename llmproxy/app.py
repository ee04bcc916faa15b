"""The composition root: builds the gateway's apps from a :class:`Config`.

Nothing else in the package constructs long-lived components; they receive
what they need from here. The main listener is aiohttp's low-level server
(:func:`build_server`), run by :class:`GatewayRunner`, which opens and closes
everything that needs the event loop; the admin API is an ``Application``
whose state goes through ``web.AppKey``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from llmproxy.admin.api import build_admin_app
from llmproxy.config.schema import Config
from llmproxy.errors import ExpectationFailed, ProxyError, proxy_error_response
from llmproxy.gateway import Gateway
from llmproxy.listener import Listener

log = logging.getLogger(__name__)


def make_handler(gateway: Gateway) -> Callable[[Any], Awaitable[web.StreamResponse]]:
    """The main listener's one handler, whichever server runs it.

    No router and no middleware: the listener routes nothing but two probes,
    and the handler is the isolation boundary of the hot path.
    """

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        # The isolation boundary: whatever escapes becomes an OpenAI-shaped
        # 500, never a traceback. The forwarder's own coroutine is awaited
        # from here, so an open stream holds no frame in between.
        try:
            if request.raw_path.startswith(("/healthz", "/readyz")):
                probe = _probe(gateway, request.path)
                if probe is not None:
                    return probe
            if "Expect" in request.headers:
                refused = await _expect(request)
                if refused is not None:
                    return refused
            forwarder = gateway.forwarder
            assert forwarder is not None, "Gateway.start() was not awaited"
            return await forwarder.handle(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return proxy_error_response(ProxyError("internal error in the gateway"))

    return handle


def build_server(gateway: Gateway) -> web.Server:
    """``server.http: aiohttp``: aiohttp's low-level server with our handler.

    No ``Application``: its router, match info and request copy cost about
    10 µs a request (5% of what a small request costs the gateway).
    """
    srv = gateway.config.server
    max_body = srv.max_body_bytes
    loop = asyncio.get_running_loop()  # as web.Server itself needs

    def request_factory(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=max_body
        )

    return web.Server(
        make_handler(gateway),
        request_factory=request_factory,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,
        max_field_size=65536,
        keepalive_timeout=srv.keepalive_timeout_s,
    )


def _probe(gateway: Gateway, path: str) -> web.Response | None:
    if path == "/healthz":
        return web.json_response({"status": "ok"})
    if path == "/readyz":
        if gateway.ready:
            return web.json_response({"status": "ready"})
        why = "draining" if gateway.draining else "no route has a healthy backend"
        return web.json_response({"status": "not ready", "reason": why}, status=503)
    return None


async def _expect(request: web.BaseRequest) -> web.Response | None:
    """``Expect: 100-continue`` (curl sends it before large bodies): say
    continue, as aiohttp's router would. Any other expectation: 417."""
    if request.headers["Expect"].lower() != "100-continue":
        return proxy_error_response(ExpectationFailed("only Expect: 100-continue is supported"))
    if request.version >= HttpVersion11 and request.body_exists:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # not part of the response's own bytes
    return None


class GatewayRunner(web.ServerRunner):
    """Runs :func:`build_server` around the gateway's life: starts the gateway
    before listening; on cleanup, once the listener has stopped accepting,
    drains its requests (``server.drain_timeout_s``) before aiohttp closes
    the connections, and closes the gateway last. Made inside the loop."""

    def __init__(self, gateway: Gateway) -> None:
        # Our drain has ended every request before aiohttp's timeout starts.
        super().__init__(build_server(gateway), shutdown_timeout=5.0)
        self.gateway = gateway
        self._started = False

    async def setup(self) -> None:
        await self.gateway.start()
        self._started = True
        try:
            await super().setup()
        except BaseException:
            await self._close_gateway()
            raise

    async def shutdown(self) -> None:
        if self._started:
            await self.gateway.drain_requests(self.gateway.config.server.drain_timeout_s)

    async def cleanup(self) -> None:
        try:
            await super().cleanup()
        finally:
            await self._close_gateway()

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        await web.TCPSite(self, host, port, backlog=BACKLOG, reuse_port=reuse_port).start()

    async def _close_gateway(self) -> None:
        if self._started:
            self._started = False
            await self.gateway.close()


class HttptoolsRunner:
    """``server.http: httptools``: runs a :class:`Listener` around the
    gateway's life, as :class:`GatewayRunner` does aiohttp's server."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.listener: Listener | None = None

    async def setup(self) -> None:
        await self.gateway.start()
        self.listener = Listener(
            make_handler(self.gateway),
            keepalive_timeout_s=self.gateway.config.server.keepalive_timeout_s,
        )

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        assert self.listener is not None, "setup() first"
        try:
            await self.listener.start(host, port, backlog=BACKLOG, reuse_port=reuse_port)
        except BaseException:
            await self.cleanup()
            raise

    @property
    def addresses(self) -> list[Any]:
        return self.listener.addresses if self.listener is not None else []

    async def cleanup(self) -> None:
        listener, self.listener = self.listener, None
        if listener is None:
            return
        try:
            listener.stop_accepting()
            await self.gateway.drain_requests(self.gateway.config.server.drain_timeout_s)
            await listener.close(5.0)
        finally:
            await self.gateway.close()


#: The listen backlog of the main listener.
BACKLOG = 4096


def make_runner(gateway: Gateway) -> GatewayRunner | HttptoolsRunner:
    """The runner of the main listener that ``server.http`` names."""
    if gateway.config.server.http == "aiohttp":
        return GatewayRunner(gateway)
    return HttptoolsRunner(gateway)


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the gateway ended up listening (ports may have been 0)."""

    url: str
    admin_url: str | None


def _bound_url(runner: web.BaseRunner | HttptoolsRunner) -> str:
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
    runner = make_runner(gateway)
    await runner.setup()
    srv = config.server
    await runner.listen(srv.host, srv.port, reuse_port=reuse_port)
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
