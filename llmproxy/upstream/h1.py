"""A lean HTTP/1.1 client for the request path: keep-alive pool, llhttp parsing.

aiohttp's client cost ~86 µs of CPU per proxied request here (py-spy under
wrk), about a third of all the gateway spent; most of it is generality a
proxy does not use (cookies, redirects, auth, decompression, tracing
signals, a StreamReader per response). This client does the one thing the
forwarder needs: send a request whose body is already in memory, over a
kept-alive connection, and hand the response body on chunk by chunk as it
arrives. Parsing is httptools (llhttp, Node's parser), so framing
(Content-Length, chunked, read-until-close, 204/304, 1xx) is a well-kept
library's business, not ours. Its behaviour is pinned by
tests/integration/test_h1_conformance.py against raw socket servers.

What it does not do, on purpose: redirects, cookies, proxies, decompression,
request body streaming (the gateway reads bodies whole: the model picks the
route and a retry must resend them), HTTP/2, upgrades.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL

#: A response head larger than this (status line and headers) is refused.
MAX_HEADER_BYTES = 64 * 1024
#: Buffered response body above which the socket stops being read (back-pressure).
HIGH_WATER = 256 * 1024

#: What :meth:`Response.forget_headers` leaves (read-only, shared).
_NO_HEADERS: MultiMapping[str] = CIMultiDictProxy(CIMultiDict())


class UpstreamError(Exception):
    """The exchange with the upstream failed; nothing usable was received."""


class ConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, timed out, TLS)."""


class Disconnected(UpstreamError):
    """The upstream closed or reset the connection before the response ended."""


class ProtocolError(UpstreamError):
    """The upstream's answer was not valid HTTP/1.1 (or its head was too large)."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: URL) -> Origin:
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {url}")
        port = url.port or (443 if url.scheme == "https" else 80)
        return cls(url.scheme, url.host, port)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class Response:
    """The status and headers of an upstream response, and its body as it comes."""

    __slots__ = (
        "_blocked",
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_released",
        "_sink",
        "_sink_error",
        "_waiter",
        "chunked",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str]
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: MultiMapping[str] = headers
        cl = headers.get("Content-Length")
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._conn = conn
        #: A list, not a deque: an idle stream holds one, and a deque's first
        #: block alone is ~600 bytes.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        #: While :meth:`splice` runs: where body chunks go, as they are parsed.
        self._sink: Callable[[bytes], bool] | None = None
        self._sink_error: BaseException | None = None
        self._blocked = False  # the sink is full: reading paused until it drains

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ('' when absent)."""
        value = self.headers.get("Content-Type", "")
        return value.split(";", 1)[0].strip().lower()

    def forget_headers(self) -> None:
        """Drop the headers once they are copied for the client: an open
        stream then does not hold them (about 0.9 KB each)."""
        self.headers = _NO_HEADERS

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self._done

    async def read_any(self) -> bytes:
        """Everything buffered now, or wait for the next bytes; b"" at the end.

        Chunks that arrived together come back as one (write coalescing for
        the relay). Raises :class:`Disconnected` or :class:`ProtocolError`
        if the body ends early or malformed.
        """
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def splice(
        self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Hand the rest of the body to ``sink`` as it arrives; return at its end.

        ``sink`` is called from the connection's ``data_received``, with the
        chunks of one read joined (write coalescing): a streamed body costs no
        task wake-up, no future and no coroutine switch per chunk, which is
        most of what relaying one SSE event costs on top of the system calls.
        ``sink`` returns False when its side is full: reading then pauses
        until ``await drain()`` returns. Raises as :meth:`read_any` does, and
        what ``sink`` raised.
        """
        self._sink = sink
        try:
            while True:
                if self._chunks:
                    self._deliver()
                if self._sink_error is not None:
                    raise self._sink_error
                if self._error is not None:
                    raise self._error
                if self._done:
                    return
                if self._blocked:
                    await drain()
                    self._blocked = False
                    self._conn.resume()
                    continue
                waiter = self._waiter = self._conn.loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
        finally:
            self._sink = None

    async def read(self, limit: int = -1) -> bytes:
        """The rest of the body (at most ``limit`` bytes if ``limit`` >= 0)."""
        parts: list[bytes] = []
        size = 0
        while limit < 0 or size < limit:
            data = await self.read_any()
            if not data:
                break
            parts.append(data)
            size += len(data)
        body = b"".join(parts)
        if 0 <= limit < len(body):
            self._chunks.insert(0, body[limit:])
            self._buffered = len(body) - limit
            body = body[:limit]
        return body

    def close(self) -> None:
        """Drop the connection now (the upstream sees the request cancelled)."""
        if not self._released:
            self._released = True
            self._conn.close()

    def release(self) -> None:
        """Done with it: keep the connection alive if the body was read to its end."""
        if self._released:
            return
        self._released = True
        if self._done and not self._chunks and self._error is None:
            self._conn.reusable_after_response()
        else:
            self._conn.close()

    # -- fed by the connection -------------------------------------------------

    def _deliver(self) -> None:
        """Splicing: pass what is buffered to the sink."""
        sink = self._sink
        if sink is None or self._sink_error is not None:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        try:
            more = sink(data)
        except Exception as exc:
            self._sink_failed(exc)
            return
        if not more:
            self._sink_full()
        elif self._conn._paused:  # a read above HIGH_WATER paused it
            self._conn.resume()

    def _sink_full(self) -> None:
        """The sink has no room: stop reading until splice() has drained it."""
        if not self._blocked:
            self._blocked = True
            self._conn.pause()
            self._wake()

    def _sink_failed(self, exc: Exception) -> None:
        # The caller's bug: raised from splice(), not in data_received.
        self._sink_error = exc
        self._wake()

    def _finish(self, error: UpstreamError | None) -> None:
        if self._done or self._error is not None:
            return
        if error is None:
            self._done = True
        else:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one request on it at a time."""

    # Slots: an open stream holds one, and an instance dict is ~400 bytes more.
    __slots__ = (
        "_head",
        "_head_bytes",
        "_head_only",
        "_headers",
        "_keep_alive",
        "_parser",
        "_paused",
        "_pool",
        "_received",
        "_response",
        "_status",
        "closed",
        "idle_since",
        "loop",
        "reused",
        "transport",
    )

    def __init__(self, pool: _OriginPool) -> None:
        self._pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        #: Waits for the response head of the request in flight.
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._head_only = False  # a HEAD request: the response has no body
        self._status = b""
        #: The head being parsed (a new one per request, from send()); None
        #: once it is handed to the Response.
        self._headers: CIMultiDict[str] | None = None
        self._head_bytes = 0
        self._received = 0  # bytes received for the request in flight
        self._keep_alive = False
        self._paused = False

    # -- used by the pool and the response -------------------------------------

    def send(self, data: bytes, *, head_only: bool) -> asyncio.Future[Response]:
        assert self.transport is not None
        assert self._head is None
        assert self._response is None
        self._head = self.loop.create_future()
        self._head_only = head_only
        self._received = 0
        self._new_message()
        self.transport.write(data)
        return self._head

    @property
    def received_nothing(self) -> bool:
        return self._received == 0

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def reusable_after_response(self) -> None:
        self._response = None
        self._head = None
        if self.closed or not self._keep_alive or self._head_only:
            self.close()
        else:
            self.reused = True
            self._pool.put_back(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._pool.forget(self)

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self._response
        if (self._head is None and response is None) or (response is not None and response._done):
            # Bytes nobody asked for: the connection cannot be trusted.
            self._keep_alive = False
            self.close()
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(ProtocolError(f"invalid HTTP response: {exc}"))
        else:
            response = self._response
            if response is not None and response._chunks and response._sink is not None:
                # Response._deliver, inlined for the relay's common case (one
                # chunk, reading not paused): once per relayed read, the call
                # was 3 % of what relaying an SSE event costs.
                chunks = response._chunks
                if len(chunks) == 1 and response._sink_error is None and not self._paused:
                    data = chunks[0]
                    chunks.clear()
                    response._buffered = 0
                    try:
                        if not response._sink(data):
                            response._sink_full()
                    except Exception as exc:
                        response._sink_failed(exc)
                else:
                    response._deliver()
            elif response is None and self._received > MAX_HEADER_BYTES:
                # httptools reports a header only once its line ends: bound the
                # bytes of a head that is still incomplete here.
                self._fail(ProtocolError(f"response head larger than {MAX_HEADER_BYTES} bytes"))

    def eof_received(self) -> bool | None:
        response = self._response
        if (
            response is not None
            and self._head is not None
            and self._head.done()
            and response.content_length is None
            and not self._parser_chunked()
            and not response._done
        ):
            # A body delimited by the end of the connection (RFC 9112 §6.3).
            self._keep_alive = False
            response._finish(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f": {exc}" if exc else ""
        self._fail(Disconnected(f"the upstream closed the connection{reason}"))

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self._response is not None:
            # A second message after the response to our request (same read).
            raise ProtocolError("the upstream sent bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        self._count_head(len(status))
        self._status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if headers is None:
            return  # a trailer field (RFC 9110 §6.5.1): not merged into the headers
        # _count_head, inlined: a call per field is a good part of its cost.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEADER_BYTES:
            raise ProtocolError(f"response head larger than {MAX_HEADER_BYTES} bytes")
        headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # Informational (100 Continue, 103 Early Hints): wait for the final one.
            self._new_message()
            return
        if code == 101:
            raise ProtocolError("the upstream switched protocols unasked")
        self._keep_alive = self._parser.should_keep_alive()
        headers = self._headers
        assert headers is not None, "a second head without a new message"
        # Held by the Response alone, which may drop them (forget_headers).
        self._headers = None
        response = self._response = Response(self, code, self._status.decode("latin-1"), headers)
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:
            self._keep_alive = False  # llhttp would wait for a body: never reuse
            response._finish(None)

    def on_body(self, body: bytes) -> None:
        # The response's buffer is filled here rather than by a method of its
        # own: this runs for every relayed chunk, and a call is a good part
        # of what a chunk costs in Python.
        response = self._response
        if response is not None and not self._head_only:
            response._chunks.append(body)
            response._buffered += len(body)
            if response._buffered > HIGH_WATER:
                self.pause()
            if response._sink is None:  # else delivered once the whole read is parsed
                response._wake()

    def on_message_complete(self) -> None:
        if self._response is not None:
            self._response._finish(None)

    # -- internals -------------------------------------------------------------

    def _new_message(self) -> None:
        self._status = b""
        self._headers = CIMultiDict()
        self._head_bytes = 0

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEADER_BYTES:
            raise ProtocolError(f"response head larger than {MAX_HEADER_BYTES} bytes")

    def _parser_chunked(self) -> bool:
        return self._response is not None and self._response.chunked

    def _fail(self, error: UpstreamError) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
            head.exception()  # retrieved: the caller may be gone (cancelled)
        if self._response is not None:
            self._response._finish(error)
        self.close()


class _OriginPool:
    """Idle kept-alive connections to one origin, most recently used first."""

    def __init__(self, client: H1Client, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.host_header = origin.host_header
        self.loop = asyncio.get_running_loop()
        self.idle: deque[_Connection] = deque()
        self.open: set[_Connection] = set()

    def take_idle(self, now: float) -> _Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.client.keepalive_s:
                conn.close()
                continue
            return conn
        return None

    def put_back(self, conn: _Connection) -> None:
        now = conn.idle_since = self.loop.time()
        idle = self.idle
        idle.append(conn)
        # Close what has idled too long, oldest first.
        limit = self.client.keepalive_s
        while idle and now - idle[0].idle_since > limit:
            idle.popleft().close()
        while len(idle) > self.client.max_idle_per_origin:
            idle.popleft().close()

    def forget(self, conn: _Connection) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)


class H1Client:
    """Keep-alive HTTP/1.1 connection pools, one per origin."""

    def __init__(
        self,
        *,
        keepalive_s: float = 60.0,
        max_idle_per_origin: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_s = keepalive_s
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl = ssl_context
        self._pools: dict[Origin, _OriginPool] = {}
        self._closed = False

    def idle_connections(self, origin: Origin) -> int:
        pool = self._pools.get(origin)
        return len(pool.idle) if pool else 0

    def open_connections(self, origin: Origin) -> int:
        pool = self._pools.get(origin)
        return len(pool.open) if pool else 0

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: CIMultiDict[str],
        body: bytes = b"",
        *,
        connect_timeout: float | None = None,
    ) -> Response:
        """Send one request; return when the response head has arrived.

        ``target`` is the raw (encoded) path and query. ``Host`` and
        ``Content-Length`` are set here; ``headers`` must hold neither, nor
        hop-by-hop headers. A connection kept alive that turns out to have
        been closed by the upstream before it answered a byte is replaced
        once by a new one (the request never reached the application).
        Cancelling the caller closes the connection.
        """
        if self._closed:
            raise UpstreamError("the client is closed")
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _OriginPool(self, origin)
        data = _serialize(method, target, pool.host_header, headers, body)
        head_only = method == "HEAD"
        conn = pool.take_idle(pool.loop.time())
        if conn is not None:
            try:
                return await conn.send(data, head_only=head_only)
            except BaseException as exc:
                conn.close()
                # The classic keep-alive race: the upstream closed an idle
                # connection as we sent on it. Try once on a new one.
                if not (isinstance(exc, Disconnected) and conn.received_nothing):
                    raise
        conn = await self._connect(pool, connect_timeout)
        try:
            return await conn.send(data, head_only=head_only)
        except BaseException:
            conn.close()
            raise

    async def _connect(self, pool: _OriginPool, limit_s: float | None) -> _Connection:
        origin = pool.origin
        loop = asyncio.get_running_loop()
        ssl_ctx: ssl.SSLContext | None = None
        if origin.scheme == "https":
            ssl_ctx = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(limit_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(pool), origin.host, origin.port, ssl=ssl_ctx
                )
        except TimeoutError as exc:
            after = f" after {limit_s:g}s" if limit_s is not None else ""
            raise ConnectError(f"connect to {origin.host}:{origin.port} timed out{after}") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        if self._closed:  # closed while this connect was under way
            conn.close()
            raise UpstreamError("the client is closed")
        pool.open.add(conn)
        return conn

    async def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for conn in list(pool.open):
                conn.close()
        self._pools.clear()


def _serialize(
    method: str, target: str, host: str, headers: CIMultiDict[str], body: bytes
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1:
        # A CR or LF inside a name, value or the target: never send it.
        raise UpstreamError("invalid character in the request head")
    return head.encode("utf-8", "surrogateescape") + body
