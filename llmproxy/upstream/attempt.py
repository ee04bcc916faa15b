"""One upstream attempt: send, wait for the first byte, commit, relay.

Before the commit point a failure raises :class:`RetryableError` (the
forwarder may try elsewhere); after it, the failure is shown to the client
and the response ends. Every attempt reports exactly one outcome to its pool
(success, failure or neutral), which feeds the breaker and outlier detection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence

from aiohttp import web
from multidict import CIMultiDict

from llmproxy.errors import NoEligibleBackend, sse_error_event
from llmproxy.observability.metrics import NONE, HistogramChild, Metrics
from llmproxy.observability.tracing import StreamSpan
from llmproxy.pool.backend import Backend
from llmproxy.pool.pool import Pool
from llmproxy.resilience.retry import RetryableError, parse_retry_after
from llmproxy.upstream.exchange import Exchange
from llmproxy.upstream.h1 import H1Client, Response, UpstreamError
from llmproxy.upstream.headers import client_response_fields, client_response_headers
from llmproxy.upstream.usage import find_usage, strip_usage_events
from llmproxy.upstream.watchdog import Expiry, Timers, Watchdog

log = logging.getLogger("llmproxy.upstream")

#: Statuses that mean "this backend cannot take it now": tried elsewhere.
RETRYABLE_STATUS = frozenset({502, 503, 504})

#: An error body kept to pass on if every retry fails; larger ones are cut.
_MAX_ERROR_BODY = 64 * 1024


class StatusRetry(RetryableError):
    """The backend answered with a retryable status; its answer is kept."""

    def __init__(
        self,
        kind: str,
        status: int,
        headers: CIMultiDict[str],
        body: bytes,
        retry_after: float | None,
    ) -> None:
        super().__init__(kind, f"HTTP {status}", retry_after, status)
        self.headers = headers
        self.body = body


class _ClientGone(Exception):
    """A write to the client failed: it closed the connection."""


#: Called after every attempt: (exchange, pool, verdict, time to first byte);
#: verdict True success, False failure, None no verdict (e.g. canary analysis).
AttemptHook = Callable[[Exchange, Pool, bool | None, float | None], None]


class AttemptRunner:
    def __init__(
        self,
        client: H1Client,
        metrics: Metrics,
        on_attempt: Sequence[AttemptHook] = (),
        *,
        keep_bodies: bool = False,
    ) -> None:
        """``keep_bodies``: the request body stays on the exchange after the
        commit point (the access log logs prompts)."""
        self._keep_bodies = keep_bodies
        self._client = client
        self._metrics = metrics
        self._on_attempt = tuple(on_attempt)
        # Made inside the loop. Held rather than asked for per request: on
        # Python 3.11 asyncio.get_running_loop() (so current_task() without
        # a loop) is a getpid() system call, and a request asked four times.
        self._loop = asyncio.get_running_loop()
        #: The watchdogs' shared timers.
        self._timers = Timers(self._loop)

    async def run(
        self, ex: Exchange, pool: Pool, backend: Backend, *, permit: bool
    ) -> web.StreamResponse:
        request = ex.request
        timeouts = pool.config.timeouts
        loop = self._loop
        task = ex.task
        assert task is not None, "an attempt runs inside the request's task"
        wd = Watchdog(self._timers, task, timeouts.first_byte_s, timeouts.idle_s, timeouts.total_s)
        backend.in_flight += 1
        upstream: Response | None = None
        resp: web.StreamResponse | None = None
        verdict: bool | None = None  # True success, False failure, None neutral
        ttfb: float | None = None
        headers = ex.upstream_headers
        assert headers is not None
        if pool.config.api_key:  # the pool's own credential (vLLM --api-key)
            headers["Authorization"] = f"Bearer {pool.config.api_key}"
        elif ex.client_authorization is not None:
            headers["Authorization"] = ex.client_authorization
        else:
            headers.popall("Authorization", None)
        span = ex.span.start_attempt(pool.name, backend.name, ex.attempts)
        span.inject(headers)
        stream_span: StreamSpan | None = None
        #: The attempt's outcome when the backend refused with a retryable status.
        refused_as: str | None = None
        try:
            try:
                upstream = await self._client.request(
                    request.method,
                    backend.origin,
                    backend.target_for(request.raw_path),
                    headers,
                    ex.body or b"",
                    connect_timeout=timeouts.connect_s,
                )
                status = upstream.status
                retry_429 = status == 429 and pool.config.retry.retry_on_429
                if status in RETRYABLE_STATUS or retry_429:
                    verdict = None if status == 429 else False
                    body = await upstream.read(_MAX_ERROR_BODY)
                    raise StatusRetry(
                        "ratelimited" if status == 429 else "status",
                        status,
                        client_response_headers(upstream.headers),
                        body,
                        parse_retry_after(upstream.headers.get("Retry-After"), time.time()),
                    )
                first = await upstream.read_any()
            except UpstreamError as exc:
                verdict = False
                ex.outcome = "upstream_error"
                self._count_error(pool, backend, "connect")
                raise RetryableError("connect", _describe(exc), None, None) from exc
            except asyncio.CancelledError:
                if wd.absorb():
                    verdict = False
                    ex.outcome = "timeout"
                    self._count_error(pool, backend, "timeout")
                    raise RetryableError(
                        "timeout", f"no first byte within {timeouts.first_byte_s:g}s", None, None
                    ) from None
                raise
            except StatusRetry as exc:
                refused_as = "ratelimited" if exc.kind == "ratelimited" else "upstream_error"
                self._count_error(pool, backend, exc.kind)
                raise

            # Commit point: from here on the client sees what happens. No
            # retry can follow, so the request's headers and body need not
            # live as long as the stream.
            ex.upstream_headers = None
            del headers
            if not self._keep_bodies:
                ex.body = None
            wd.last = now = loop.time()
            ex.ttfb_s = ttfb = now - ex.started
            ex.status = status
            verdict = status < 500
            m = self._metrics
            if upstream.complete and first and upstream.content_length == len(first):
                # The whole (small, non-streamed) body came in one read: answer
                # with one write instead of headers, body and end separately.
                # Sent here, not once the handler returns: the bookkeeping
                # that follows (metrics, hooks, access log) then runs after
                # the client has its answer, off its latency.
                ex.outcome = "ok" if verdict else "upstream_error"
                ex.bytes_sent = len(first)
                try:
                    whole = self._reply(request, ex, status, upstream, first)
                    resp = whole
                    if whole is None:  # not our listener's request (or HEAD): aiohttp's
                        resp = whole = web.Response(
                            status=status,
                            headers=client_response_headers(upstream.headers),
                            body=first,
                        )
                        self.finish_headers(whole, ex)
                        await whole.prepare(request)
                        await whole.write_eof()
                except ConnectionError as exc:
                    raise _ClientGone from exc
                m.child(m.ttfb, ex.route, ex.pool, ex.backend).observe(ttfb)
                usage = find_usage(first[-4096:])
                if usage is not None:
                    ex.prompt_tokens, ex.completion_tokens = usage
                return whole
            resp = web.StreamResponse(
                status=status, headers=client_response_headers(upstream.headers)
            )
            self.finish_headers(resp, ex)
            await resp.prepare(request)
            m.child(m.ttfb, ex.route, ex.pool, ex.backend).observe(ttfb)
            is_sse = ex.stream = upstream.content_type == "text/event-stream"
            upstream.forget_headers()  # copied for the client; not held while streaming
            if is_sse:
                stream_span = ex.span.start_stream()
            ex.outcome = "ok" if verdict else "upstream_error"
            gaps = m.child(m.inter_chunk, ex.route, ex.pool) if is_sse else None
            # The relay is awaited from here, not from a coroutine of its own:
            # an open stream holds one frame less.
            relay = _Splice(loop, request, wd, ex, gaps, since=now)
            try:
                if first:
                    await relay.begin(resp, first)
                    await upstream.splice(relay.sink, relay.drain)
                    await relay.end(resp)
            except asyncio.CancelledError:
                if wd.absorb():
                    verdict = False
                    await self._fail_midstream(
                        ex, pool, backend, resp, is_sse=is_sse, message=_expiry(wd)
                    )
                elif ex.aborting is not None:
                    _uncancel()
                    verdict = None
                    await self._fail_midstream(
                        ex, pool, backend, resp, is_sse=is_sse, message=ex.aborting
                    )
                else:
                    raise
            except UpstreamError as exc:
                if _client_gone(request):
                    raise _ClientGone from exc
                verdict = False
                await self._fail_midstream(
                    ex, pool, backend, resp, is_sse=is_sse, message=f"upstream failed: {exc}"
                )
            except ConnectionError as exc:  # writing to a client that has gone
                raise _ClientGone from exc
            except Exception:
                # Isolation boundary: a bug of ours after the commit point must
                # still end the response visibly, never leave the client hanging.
                log.exception("request %s: error while relaying the response", ex.request_id)
                verdict = None
                await self._fail_midstream(
                    ex, pool, backend, resp, is_sse=is_sse, message="internal error in the gateway"
                )
            else:
                await resp.write_eof()
                usage = find_usage(relay.tail())
                if usage is not None:
                    ex.prompt_tokens, ex.completion_tokens = usage
            return resp
        except (asyncio.CancelledError, _ClientGone) as exc:
            verdict = None
            if isinstance(exc, asyncio.CancelledError) and ex.aborting is not None and resp is None:
                # Shutdown before the commit point: the client may retry elsewhere.
                _uncancel()
                raise NoEligibleBackend(ex.aborting, headers={"Retry-After": "1"}) from None
            # The client went away (or the server is stopping): close the
            # upstream connection now so the replica stops generating.
            ex.status, ex.outcome = 499, "client_closed"
            if upstream is not None:
                upstream.close()
            self._metrics.upstream_cancelled.labels(ex.pool, ex.backend).inc()
            if isinstance(exc, _ClientGone) and resp is not None:
                return resp
            raise
        finally:
            wd.stop()
            backend.in_flight -= 1
            outcome = refused_as or (
                "ok" if verdict else ("client_closed" if verdict is None else ex.outcome)
            )
            span.end(outcome, upstream.status if upstream is not None else None, ex.error)
            if stream_span is not None:
                stream_span.end(ex.outcome, chunks=ex.chunks, bytes_sent=ex.bytes_sent)
            for hook in self._on_attempt:
                hook(ex, pool, verdict, ttfb)
            if upstream is not None:
                # Back to the keep-alive pool if the body was read to the end;
                # the connection is closed otherwise.
                upstream.release()
            if verdict is True:
                pool.record_success(backend, ttfb, permit=permit)
            elif verdict is False:
                pool.record_failure(backend, permit=permit)
            else:
                pool.record_neutral(backend, permit=permit)

    def _count_error(self, pool: Pool, backend: Backend, kind: str) -> None:
        self._metrics.upstream_errors.labels(pool.name, backend.name, kind).inc()

    async def _fail_midstream(
        self,
        ex: Exchange,
        pool: Pool,
        backend: Backend,
        resp: web.StreamResponse,
        *,
        is_sse: bool,
        message: str,
    ) -> None:
        self._count_error(pool, backend, "midstream")
        self._metrics.midstream_failures.labels(pool.name, backend.name).inc()
        ex.outcome, ex.error = "midstream_error", message
        log.warning("request %s on %s/%s: %s", ex.request_id, pool.name, backend.name, message)
        if is_sse:
            try:
                await resp.write(sse_error_event(message))
                await resp.write_eof()
            except ConnectionError:
                log.debug("client left before the SSE error event was written")
        elif ex.request.transport is not None:
            # No terminating chunk and no missing Content-Length bytes: the
            # client can tell the body is incomplete.
            ex.request.transport.close()

    @staticmethod
    def _reply(
        request: web.BaseRequest, ex: Exchange, status: int, upstream: Response, body: bytes
    ) -> web.StreamResponse | None:
        """The whole answer through the listener's ``Request.reply`` (one
        write, no aiohttp response); None where that is not on offer."""
        reply = getattr(request, "reply", None)
        if reply is None:
            return None
        fields = client_response_fields(upstream.headers, ex.response_headers)
        fields.append(("x-request-id", ex.request_id))
        if ex.backend is not NONE:
            fields.append(("x-llmproxy-backend", ex.backend))
            fields.append(("x-llmproxy-pool", ex.pool))
        fields.append(("x-llmproxy-attempts", str(ex.attempts)))
        answered: web.StreamResponse | None = reply(status, fields, body)
        return answered

    @staticmethod
    def finish_headers(resp: web.StreamResponse, ex: Exchange) -> None:
        h = resp.headers
        if ex.response_headers:
            h.update(ex.response_headers)
        h["x-request-id"] = ex.request_id
        if ex.backend is not NONE:
            h["x-llmproxy-backend"] = ex.backend
            h["x-llmproxy-pool"] = ex.pool
        h["x-llmproxy-attempts"] = str(ex.attempts)


class _Splice:
    """Copies a body to the client as it arrives; no buffering.

    The first chunk goes through aiohttp (:meth:`begin`), which sends the
    response head with it. The rest is spliced: the upstream connection hands
    each read to :meth:`sink` as it is parsed, which writes it to the client's
    transport in the framing aiohttp chose for the response. No task wakes
    per chunk; when the client reads slower than the replica writes, reading
    the replica pauses until the client's buffer drains (:meth:`drain`).

    Counts chunks and bytes into the exchange; observes the gap between
    chunks of a stream into ``gaps``; hides the usage event the gateway asked
    for (``ex.strip_usage``); keeps the last bytes relayed, where ``usage``
    is (:meth:`tail`). An object with slots rather than a closure's cells, as
    an open stream holds it.
    """

    __slots__ = (
        "carry",
        "chunked",
        "ex",
        "gaps",
        "high",
        "last",
        "loop",
        "prev",
        "request",
        "strip",
        "then",
        "transport",
        "wd",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: web.BaseRequest,
        wd: Watchdog,
        ex: Exchange,
        gaps: HistogramChild | None,
        *,
        since: float,
    ) -> None:
        """``since``: when the first chunk came (the first gap starts there)."""
        self.loop = loop
        self.request = request
        self.transport: asyncio.Transport | None = None  # set once the head is sent
        self.chunked = False
        self.high = 0
        self.wd = wd
        self.ex = ex
        self.gaps = gaps
        self.strip = ex.strip_usage
        self.carry = b""  # with strip: the incomplete SSE event held until it ends
        self.prev = self.last = b""
        self.then = since

    async def begin(self, resp: web.StreamResponse, first: bytes) -> None:
        """Send the head with the first chunk; the sink takes over from here."""
        data = self.whole_events(first) if self.strip else first
        # Even empty: the head must be on the wire before the sink writes.
        await resp.write(data)
        if data:
            self.ex.bytes_sent, self.ex.chunks, self.last = len(data), 1, data
        transport = self.request.transport
        if transport is None:
            raise ConnectionResetError("the client left")
        self.transport = transport
        self.chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        # The head is on the wire: its map (and the upstream's header strings
        # in it) need not live as long as the stream. aiohttp reads it only
        # while preparing the response.
        resp.headers.clear()
        self.high = transport.get_write_buffer_limits()[1]

    async def end(self, resp: web.StreamResponse) -> None:
        if self.carry:  # the stream ended inside an event: pass on what came
            await resp.write(self.carry)
            self.ex.bytes_sent += len(self.carry)

    def tail(self) -> bytes:
        return self.prev[-1024:] + self.last[-4096:]

    def whole_events(self, data: bytes) -> bytes:
        data, self.carry = _whole_events(self.carry + data)
        if b'"usage"' in data:
            data, usage = strip_usage_events(data)
            if usage is not None:
                self.ex.prompt_tokens, self.ex.completion_tokens = usage
        return data

    def sink(self, data: bytes) -> bool:
        now = self.loop.time()
        gaps = self.gaps
        if gaps is not None:  # HistogramChild.observe, inlined: once per chunk
            gap = now - self.then
            gaps.counts[bisect_left(gaps.bounds, gap)] += 1
            gaps.sum += gap
        self.wd.last = self.then = now
        if self.strip:
            data = self.whole_events(data)
            if not data:
                return True
        transport = self.transport
        assert transport is not None, "sink() before the head was sent"
        if transport.is_closing():
            return False  # splice() then drains, which raises
        size = len(data)
        transport.write(b"%x\r\n%b\r\n" % (size, data) if self.chunked else data)
        ex = self.ex
        ex.bytes_sent += size
        ex.chunks += 1
        self.prev, self.last = self.last, data
        return transport.get_write_buffer_size() <= self.high

    async def drain(self) -> None:
        if _client_gone(self.request):
            raise ConnectionResetError("the client left")
        await self.request.writer.drain()


def _whole_events(data: bytes) -> tuple[bytes, bytes]:
    """Split at the end of the last complete SSE event: (events, the rest)."""
    end = data.rfind(b"\n\n")
    if end < 0:
        return b"", data
    return data[: end + 2], data[end + 2 :]


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _expiry(wd: Watchdog) -> str:
    if wd.expired is Expiry.TOTAL:
        return "upstream response exceeded the total timeout"
    return "upstream went silent longer than the idle timeout"
