"""The forwarder: from a matched route to a relayed response.

The commit point (ARCHITECTURE §2) organises this module. Until the first
byte of the response body reaches the client, any failure of a backend (a
connect error, a first-byte timeout, a retryable status) moves the request to
another backend and the client sees nothing. After it, a failure ends the
response visibly: an SSE error event for streams, a closed connection (never a
falsely complete body) for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from llmproxy.balancing.base import PickContext
from llmproxy.errors import (
    NoEligibleBackend,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
    proxy_error_response,
    sse_error_event,
)
from llmproxy.observability.metrics import NONE, Metrics
from llmproxy.pool.backend import Backend
from llmproxy.pool.pool import Pool
from llmproxy.routing.split import choose_pool, sticky_key
from llmproxy.runtime import Runtime
from llmproxy.upstream.headers import client_response_headers, upstream_request_headers
from llmproxy.upstream.request import ParsedRequest, parse_request
from llmproxy.upstream.watchdog import Expiry, Watchdog

log = logging.getLogger(__name__)

#: Statuses that mean "this backend cannot take it now": tried elsewhere.
RETRYABLE_STATUS = frozenset({502, 503, 504})

#: aiohttp adds these when absent; a proxy must not invent them (an added
#: Accept-Encoding would have the replica compress for a client that never
#: asked).
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


@dataclass(slots=True)
class Exchange:
    """One client request across its upstream attempts."""

    request: web.Request
    request_id: str
    #: Event-loop time when the request arrived.
    started: float
    body: bytes | None = None
    upstream_headers: CIMultiDict[str] | None = None
    route: str = NONE
    pool: str = NONE
    backend: str = NONE
    attempts: int = 0


class _ClientGone(Exception):
    """A write to the client failed: it closed the connection."""


class _Retry(Exception):
    """This attempt failed before the commit point; try another backend."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Forwarder:
    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        rng: random.Random,
        runtime: Callable[[], Runtime],
        max_body_bytes: int,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._rng = rng
        self._runtime = runtime
        self._max_body = max_body_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        request_id = request.headers.get("X-Request-Id") or os.urandom(16).hex()
        ex = Exchange(request, request_id, started)
        try:
            parsed = await parse_request(request, self._runtime(), self._max_body)
            return await self._forward(ex, parsed)
        except ProxyError as exc:
            resp = proxy_error_response(exc)
            self._set_headers(resp, ex)
            self._observe(ex, exc.status, loop.time())
            return resp

    async def _forward(self, ex: Exchange, parsed: ParsedRequest) -> web.StreamResponse:
        request = ex.request
        runtime = parsed.runtime
        route = parsed.route
        ex.route = route.name
        client_ip = request.remote
        key = sticky_key(route, request.headers, parsed.api_key, client_ip)
        first = choose_pool(route.split, key, self._rng)
        pool_names = [first, *(p for p in route.fallback if p != first)]
        ex.upstream_headers = upstream_request_headers(
            request.headers, client_ip=client_ip, scheme=request.scheme, request_id=ex.request_id
        )
        ctx = PickContext(hash_key=key)
        ex.body = parsed.body or None
        last_error: ProxyError | None = None
        for pool_name in pool_names:
            pool = runtime.pools[pool_name]
            ex.pool = pool_name
            tried: list[Backend] = []
            attempts = pool.config.retry.attempts
            for n in range(1, attempts + 1):
                backend = pool.pick(ctx, tried)
                if backend is None:
                    break
                tried.append(backend)
                ex.backend = backend.name
                ex.attempts += 1
                is_last = n == attempts and pool_name == pool_names[-1]
                try:
                    return await self._attempt(ex, pool, backend, is_last=is_last)
                except _Retry as exc:
                    self._metrics.upstream_errors.labels(pool_name, backend.name, exc.kind).inc()
                    log.info(
                        "request %s: attempt %d on %s/%s failed before the first byte: %s",
                        ex.request_id, ex.attempts, pool_name, backend.name, exc,
                    )  # fmt: skip
                    last_error = (
                        UpstreamTimeout(str(exc))
                        if exc.kind == "timeout"
                        else UpstreamError(str(exc))
                    )
        if last_error is None:
            raise NoEligibleBackend(
                f"no healthy backend for route '{route.name}'", headers={"Retry-After": "1"}
            )
        raise last_error

    async def _attempt(
        self, ex: Exchange, pool: Pool, backend: Backend, *, is_last: bool
    ) -> web.StreamResponse:
        """One upstream attempt; raises ``_Retry`` before the commit point."""
        request = ex.request
        timeouts = pool.config.timeouts
        wd = Watchdog(timeouts.first_byte_s, timeouts.idle_s, timeouts.total_s)
        backend.in_flight += 1
        upstream: aiohttp.ClientResponse | None = None
        try:
            try:
                upstream = await self._session.request(
                    request.method,
                    backend.url_for(request.raw_path),
                    data=ex.body,
                    headers=ex.upstream_headers,
                    allow_redirects=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                    timeout=pool.client_timeout,
                )
                if upstream.status in RETRYABLE_STATUS and not is_last:
                    raise _Retry("status", f"HTTP {upstream.status}")
                first = await upstream.content.readany()
            except aiohttp.ClientError as exc:
                raise _Retry("connect", f"{type(exc).__name__}: {exc}") from exc
            except asyncio.CancelledError:
                if wd.absorb():
                    raise _Retry(
                        "timeout", f"no first byte within {timeouts.first_byte_s}s"
                    ) from None
                raise
            # Commit point: from here on the client sees what happens.
            wd.last = asyncio.get_running_loop().time()
            resp = web.StreamResponse(
                status=upstream.status, headers=client_response_headers(upstream.headers)
            )
            self._set_headers(resp, ex)
            await resp.prepare(request)
            self._metrics.ttfb.labels(ex.route, ex.pool, ex.backend).observe(wd.last - ex.started)
            is_sse = upstream.content_type == "text/event-stream"
            try:
                await self._relay(upstream, resp, first, wd)
            except asyncio.CancelledError:
                if not wd.absorb():
                    raise
                await self._fail_midstream(ex, resp, is_sse, _expiry_message(wd))
            except aiohttp.ClientError as exc:
                if _client_gone(request):
                    raise _ClientGone from exc
                await self._fail_midstream(ex, resp, is_sse, f"upstream failed mid-response: {exc}")
            else:
                await resp.write_eof()
            self._observe(ex, upstream.status, asyncio.get_running_loop().time())
            return resp
        except (asyncio.CancelledError, _ClientGone) as exc:
            # Not the watchdog: the client went away (or the server is stopping).
            # Close the upstream connection now so the replica stops generating.
            if upstream is not None:
                upstream.close()
            self._metrics.upstream_cancelled.labels(ex.pool, ex.backend).inc()
            if isinstance(exc, _ClientGone):
                return web.Response(status=499)
            raise
        finally:
            wd.stop()
            backend.in_flight -= 1
            if upstream is not None:
                # Back to the keep-alive pool if the body was read to the end;
                # aiohttp closes the connection otherwise.
                upstream.release()

    @staticmethod
    async def _relay(
        upstream: aiohttp.ClientResponse, resp: web.StreamResponse, first: bytes, wd: Watchdog
    ) -> None:
        """Copy the body chunk by chunk, as it arrives; no buffering."""
        if not first:
            return
        loop = asyncio.get_running_loop()
        await resp.write(first)
        read = upstream.content.readany
        write = resp.write
        while chunk := await read():
            await write(chunk)
            wd.last = loop.time()

    async def _fail_midstream(
        self, ex: Exchange, resp: web.StreamResponse, is_sse: bool, message: str
    ) -> None:
        request = ex.request
        self._metrics.upstream_errors.labels(ex.pool, ex.backend, "midstream").inc()
        log.warning("request %s on %s/%s: %s", ex.request_id, ex.pool, ex.backend, message)
        if is_sse:
            try:
                await resp.write(sse_error_event(message))
                await resp.write_eof()
            except ConnectionError:
                log.debug("client left before the SSE error event was written")
        elif request.transport is not None:
            # No terminating chunk and no missing Content-Length bytes: the
            # client can tell the body is incomplete.
            request.transport.close()

    @staticmethod
    def _set_headers(resp: web.StreamResponse, ex: Exchange) -> None:
        h = resp.headers
        h["x-request-id"] = ex.request_id
        if ex.backend is not NONE:
            h["x-llmproxy-backend"] = ex.backend
            h["x-llmproxy-pool"] = ex.pool
        h["x-llmproxy-attempts"] = str(ex.attempts)

    def _observe(self, ex: Exchange, status: int, ended: float) -> None:
        m = self._metrics
        m.requests.labels(ex.route, ex.pool, ex.backend, str(status)).inc()
        m.duration.labels(ex.route, ex.pool).observe(ended - ex.started)


def _expiry_message(wd: Watchdog) -> str:
    if wd.expired is Expiry.TOTAL:
        return "upstream response exceeded the total timeout"
    return "upstream went silent longer than the idle timeout"


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
