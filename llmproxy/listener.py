"""The main listener's HTTP/1.1 server on httptools (llhttp), for the hot path.

aiohttp's server costs about 40 µs and 9.8 KB a connection: a request
handler with a parser, a task per connection and one per request, a
keep-alive timer for the connection's whole life, two deques, a parsed URL
and a request object with its cache. This one keeps per connection a
protocol with slots, the llhttp parser and, while a request is in flight,
one task and the request (method, target, headers). The handler's
responses are aiohttp's (``web.Response``, ``web.StreamResponse``), written
through aiohttp's ``StreamWriter``: framing, ``Date``, ``Connection`` and
HEAD stay aiohttp's, as with the low-level server; except a whole body the
gateway already holds, which :meth:`Request.reply` writes with its head in
one write (the head aiohttp would write, without its response object).

An open stream costs 12.2 KB of Python objects here against 17.0 KB on
aiohttp's server (tracemalloc over 1,000 idle streams).

What it does (``tests/integration/test_listener_conformance.py`` and
``test_listener.py`` check it, on both servers where they agree):
keep-alive, pipelined requests answered in order, Content-Length and
chunked request bodies with flow control, HTTP/1.0, a bounded head (JSON
431), malformed input (JSON 400, then close, no traceback in the log), a
keep-alive timeout that also covers a head never completed, a request
body that stops coming for that long answered 408, a lingering close (the
client's unread bytes never reset the connection under the reply), and a
client that leaves cancels its request's task, so its upstream request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import unquote

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict, CIMultiDictProxy

from llmproxy.errors import BadRequest, RequestTimeout, error_body

log = logging.getLogger(__name__)

#: Largest request head (request line and fields), as aiohttp's limits allowed.
MAX_HEAD_BYTES = 64 * 1024 + 8 * 1024
#: Request body bytes buffered before reading the client pauses.
BODY_HIGH_WATER = 256 * 1024
#: How long a closing connection drops what the client still sends.
LINGER_S = 2.0
#: Header fields in a request head, at most (as aiohttp's default).
MAX_FIELDS = 128
#: Requests parsed ahead of the one being handled (pipelining) before reading pauses.
MAX_PIPELINED = 8
#: The resolution of the loop's clock (uvloop's is a millisecond).
CLOCK_STEP_S = 0.001

Handler = Callable[["Request"], Awaitable[web.StreamResponse]]

#: What :meth:`Request.reply` returns for the handler to return: never
#: prepared or written (the server sees the request was answered).
ANSWERED: web.StreamResponse = web.StreamResponse()

#: Fields :meth:`Request.reply` sets itself, or (Date, Server, Content-Type)
#: only when the given ones lack them.
_OWN_FIELDS = frozenset({"content-length", "connection", "transfer-encoding"})
_DEFAULT_FIELDS = frozenset({"date", "server", "content-type"})
#: (HTTP version, status) -> the status line :meth:`Request.reply` writes.
_STATUS_LINES: dict[tuple[HttpVersion, int], str] = {}


class HeadTooLarge(Exception):
    pass


class Body:
    """A request body as it arrives: what ``request.content`` was for aiohttp."""

    __slots__ = ("_chunks", "_eof", "_error", "_proto", "_size", "_waiter")

    def __init__(self, proto: HttpProtocol) -> None:
        self._proto = proto
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH_WATER:
            self._proto.hold_reading(self)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._error = exc
            self._wake()

    @property
    def over_high_water(self) -> bool:
        return self._size > BODY_HIGH_WATER

    @property
    def complete(self) -> bool:
        """Every byte of the body has arrived (not necessarily been read)."""
        return self._eof

    async def readany(self) -> bytes:
        """What has arrived (waiting for some); ``b""`` at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = self._proto.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._proto.release_reading(self)
        return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Request:
    """One request, with the part of ``web.BaseRequest``'s interface the
    gateway uses (and aiohttp's responses need to prepare themselves)."""

    __slots__ = (
        "_proto",
        "_writer",
        "answered",
        "content",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "version",
    )

    scheme = "http"

    def __init__(
        self,
        proto: HttpProtocol,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        *,
        version: HttpVersion,
        keep_alive: bool,
        content: Body | None,
    ) -> None:
        self._proto = proto
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content = content
        self._writer: StreamWriter | None = None
        #: Set by :meth:`reply`: whether the connection stays open after it.
        self.answered: bool | None = None

    @property
    def _payload_writer(self) -> StreamWriter:
        """aiohttp's writer for a response it prepares (made when first asked
        for: a request answered by :meth:`reply` needs none).

        Such a response may be a stream that stays open for minutes: with
        the whole request in, the keep-alive timer is stopped here rather
        than held by the open stream (about 0.6 KiB), and armed again when
        the request ends."""
        writer = self._writer
        if writer is None:
            proto = self._proto
            writer = self._writer = StreamWriter(proto, proto.loop)
            if proto._body is None and not proto._lingering:
                proto._stop_idle()
        return writer

    def reply(
        self, status: int, fields: list[tuple[str, str]], body: bytes
    ) -> web.StreamResponse | None:
        """Answer with a whole body in one write, without an aiohttp response
        (about 8 µs less per request). The head is the one aiohttp would
        write for ``web.Response(status=status, headers=fields, body=body)``:
        Content-Length of the body; Date, Server and Content-Type if
        ``fields`` lack them; ``Connection`` as keep-alive requires.

        Returns :data:`ANSWERED` for the handler to return, or ``None`` when
        the response is one this does not write (a bodiless status, HEAD,
        or a response already begun): then answer through aiohttp.
        """
        if not body or status < 200 or status in (204, 304) or self.method == "HEAD":
            return None
        if self._writer is not None or self.answered is not None:
            return None
        proto = self._proto
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left")
        content = self.content
        keep = self.keep_alive and not (
            (content is not None and not content.complete)  # the rest is not read
            or (proto._last and not proto._queue)
            or proto._server.closing
        )
        version = self.version
        first = _STATUS_LINES.get((version, status))
        if first is None:  # bounded: statuses are three digits, versions two
            first = _STATUS_LINES[version, status] = (
                f"HTTP/{version[0]}.{version[1]} {status} {REASON_PHRASES.get(status, '')}\r\n"
            )
        lines = [first]
        missing = _DEFAULT_FIELDS
        for name, value in fields:
            lower = name.lower()
            if lower in _OWN_FIELDS:
                continue
            if lower in missing:
                missing = missing - {lower}
            lines.append(f"{name}: {value}\r\n")
        if missing:
            if "content-type" in missing:
                lines.append("Content-Type: application/octet-stream\r\n")
            if "date" in missing:
                lines.append(f"Date: {rfc822_formatted_time()}\r\n")
            if "server" in missing:
                lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n")
        if keep:
            if version == HttpVersion10:
                lines.append("Connection: keep-alive\r\n")
        elif version == HttpVersion11:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        if head.count("\n") != len(lines) or head.count("\r") != len(lines):
            raise ValueError("a response header holds a CR or LF")  # as aiohttp refuses
        transport.write(head.encode("utf-8", "surrogateescape") + body)
        self.answered = keep
        return ANSWERED

    @property
    def path(self) -> str:
        """The target's path, percent-decoded, without the query."""
        path = self.raw_path.partition("?")[0]
        return unquote(path) if "%" in path else path

    @property
    def writer(self) -> StreamWriter:
        return self._payload_writer

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._proto.transport

    @property
    def remote(self) -> str | None:
        return self._proto.peer

    @property
    def body_exists(self) -> bool:
        return self.content is not None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    @property
    def content_type(self) -> str:
        raw = self.headers.get("Content-Type")
        if not raw:
            return "application/octet-stream"
        return raw.partition(";")[0].strip().lower()

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        return None


class HttpProtocol(BaseProtocol):
    """One client connection."""

    __slots__ = (
        "_body",
        "_fields",
        "_head_bytes",
        "_headers",
        "_heard",
        "_idle",
        "_last",
        "_lingering",
        "_llhttp",
        "_queue",
        "_refusal",
        "_server",
        "_task",
        "_url",
        "loop",
        "peer",
    )

    def __init__(self, server: Listener) -> None:
        super().__init__(server.loop)
        self.loop = server.loop
        self._server = server
        self._llhttp = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: CIMultiDict[str] | None = None
        self._head_bytes = 0
        self._fields = 0
        self._body: Body | None = None  # of the message being parsed
        #: Requests parsed, waiting for the one in flight (pipelining).
        self._queue: list[Request] = []
        self._task: asyncio.Task[None] | None = None
        #: The keep-alive timer (armed while no request is under way or a
        #: body is on its way, and left to run out rather than cancelled when
        #: a request begins); the linger timer.
        self._idle: asyncio.TimerHandle | None = None
        #: When the client was last heard from: the last bytes of the body
        #: on its way, or the connection's last request ended.
        self._heard = 0.0
        #: No request follows those parsed: the connection closes after them.
        self._last = False
        #: Half-closed: what the client still sends is dropped until it closes.
        self._lingering = False
        #: The error reply to send once the requests before it are answered.
        self._refusal: bytes | None = None
        self.peer: str | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self._server.connections.add(self)
        self._wait_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        self._stop_idle()
        gone = ConnectionResetError("the client closed the connection")
        if self._body is not None:
            self._body.fail(gone)
        for queued in self._queue:
            if queued.content is not None:
                queued.content.fail(gone)
        self._queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a client that leaves cancels its request

    def data_received(self, data: bytes) -> None:
        if self._last and self._body is None:
            return  # after the last request: dropped
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asking to switch is answered (not switched), and is the last.
            self._end_reading()
        except httptools.HttpParserError as exc:
            self._malformed(exc)

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = CIMultiDict()
        self._head_bytes = 0
        self._fields = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # _count, inlined: a call per field is a good part of its cost.
        self._head_bytes += len(name) + len(value) + 4
        self._fields += 1
        if self._fields > MAX_FIELDS or self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge
        assert self._headers is not None
        self._headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        parser = self._llhttp
        headers = self._headers
        assert headers is not None
        self._headers = None
        version = HttpVersion11 if parser.get_http_version() == "1.1" else HttpVersion10
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = headers.get("Content-Length")
        has_body = chunked or (length is not None and length.strip() not in ("", "0"))
        body = self._body = Body(self) if has_body else None
        if body is not None:
            self._watch_body()
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            _origin_form(self._url.decode("utf-8", "surrogateescape")),
            CIMultiDictProxy(headers),
            version=version,
            keep_alive=parser.should_keep_alive(),
            content=body,
        )
        self._url = b""
        if not request.keep_alive:
            self._last = True  # its body is still read
        if self._task is None:
            self._start(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED:
                self._pause()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._heard = self.loop.time()
            self._body.feed(body)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.feed_eof()
            self._body = None
        if self._last:
            self._pause()

    # -- flow control ----------------------------------------------------------

    def hold_reading(self, body: Body) -> None:
        self._pause()

    def release_reading(self, body: Body | None) -> None:
        """Reading goes on, unless something else holds it."""
        if not self._reading_paused or self.transport is None:
            return
        if self._lingering or (
            not (self._last and self._body is None)
            and len(self._queue) < MAX_PIPELINED
            and (self._body is None or not self._body.over_high_water)
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def _end_reading(self) -> None:
        self._last = True
        self._body = None
        self._pause()

    def _pause(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- requests --------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        keep = False
        body = request.content
        try:
            resp = await self._server.handler(request)
            if request.answered is not None:  # by request.reply(): nothing left to write
                keep = request.answered
                return
            if (
                (body is not None and not body.complete)  # the rest is not read: close
                or (self._last and not self._queue)
                or self._server.closing
            ):
                resp.force_close()  # says `Connection: close` if not sent yet
            # As aiohttp's server does with what a handler returns.
            await resp.prepare(cast(web.BaseRequest, request))
            await resp.write_eof()
            keep = bool(resp.keep_alive) and request.keep_alive
        except ConnectionError:
            pass
        except Exception:
            log.exception("unhandled error writing the response to %s", request.method)
        finally:
            # Cancelled (the client left, or shutdown) included.
            self._task = None
            self._done(request, keep)

    def _done(self, request: Request, keep: bool) -> None:
        if self.transport is None:
            return
        body = request.content
        if body is not None and not body.complete:
            keep = False  # the rest of the body would be taken for the next request
        if not keep or self._server.closing:
            self._close()
        elif self._queue:
            self._start(self._queue.pop(0))
            self.release_reading(None)
        elif self._refusal is not None:
            self.transport.write(self._refusal)
            self._close()
        elif self._last:
            self._close()
        else:
            self._wait_idle()

    def _malformed(self, exc: httptools.HttpParserError) -> None:
        if self._last and self._body is None:
            return  # bytes after a `Connection: close` request: dropped
        cause = exc.__cause__ or exc.__context__
        body = self._body
        if isinstance(cause, HeadTooLarge):
            self._refuse(431, "The request head is too large.")
        elif body is not None:
            # The head was good: the request (under way or queued) answers
            # for itself when it reads its body; nothing after it is read.
            self._end_reading()
            body.fail(BadRequest(f"Malformed request body: {exc}"))
        else:
            self._refuse(400, f"Malformed HTTP request: {exc}")

    def _refuse(self, status: int, message: str) -> None:
        """A clean error for input that is not a request we can take; then close."""
        self._end_reading()
        reason = {400: "Bad Request", 431: "Request Header Fields Too Large"}[status]
        body = error_body(message, "invalid_request_error", None)
        reply = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (status, reason.encode(), len(body), body)
        )
        if self._task is not None:  # answered after the requests before it
            self._refusal = reply
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            self._close()

    def _close(self) -> None:
        """Close once what was written is sent. Half-closes first and drops
        what the client still sends (the rest of a body not read, input
        refused) for up to :data:`LINGER_S`: closing with bytes unread would
        reset the connection, and the reset can destroy the reply on its way
        (nginx's lingering close)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        self._stop_idle()
        if not transport.can_write_eof():
            transport.close()
            return
        self._lingering = self._last = True
        self._body = None
        transport.write_eof()
        self.release_reading(None)
        self._idle = self.loop.call_later(LINGER_S, transport.close)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge

    # -- keep-alive ------------------------------------------------------------

    def _wait_idle(self) -> None:
        """Until the next request's head is complete: the keep-alive timeout.

        A timer still running from before (the request that just ended began
        within its time) is kept: it looks at ``_heard`` when it fires and
        waits again for the rest. Arming and cancelling a timer per request
        would cost about 2.7 µs (uvloop, timeit)."""
        self._heard = self.loop.time()
        timeout = self._server.keepalive_timeout_s
        if timeout > 0 and self._idle is None and not self._last:
            self._idle = self.loop.call_later(timeout, self._idle_expired)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _watch_body(self) -> None:
        """A body is on its way: the client may go quiet for as long as the
        keep-alive timeout between two reads of it."""
        self._heard = self.loop.time()
        timeout = self._server.keepalive_timeout_s
        if timeout > 0 and self._idle is None:
            self._idle = self.loop.call_later(timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.transport is None:
            return
        body = self._body
        timeout = self._server.keepalive_timeout_s
        # uvloop's clock steps in milliseconds, and a timer may fire a hair
        # before its time by it: within a millisecond counts as run out.
        quiet = self.loop.time() - self._heard + CLOCK_STEP_S
        if body is None:
            if self._task is not None:
                return  # a request is under way; _wait_idle arms again after it
            if quiet < timeout:  # idle again since a request that began meanwhile
                self._idle = self.loop.call_later(timeout - quiet, self._idle_expired)
            else:
                self.transport.close()
            return
        if self._reading_paused:  # we are not reading: the client is not late
            self._heard, quiet = self.loop.time(), 0.0
        if quiet < timeout:
            self._idle = self.loop.call_later(timeout - quiet, self._idle_expired)
            return
        # The request answers 408 when it reads its body; nothing after it is read.
        self._end_reading()
        body.fail(RequestTimeout(f"no request body bytes for {timeout:g} s"))

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task of the request in flight."""
        return self._task

    def close_if_idle(self) -> None:
        if self._task is None and not self._queue and self.transport is not None:
            self.transport.close()


def _origin_form(target: str) -> str:
    """``/path?query`` of a request target; an absolute-form target (as sent
    to a forward proxy) loses its scheme and authority."""
    if target.startswith(("http://", "https://")):
        rest = target.partition("://")[2]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return target


class Listener:
    """Accepts connections for ``handler``; :meth:`close` stops it gracefully."""

    def __init__(self, handler: Handler, *, keepalive_timeout_s: float = 75.0) -> None:
        self.handler = handler
        self.keepalive_timeout_s = keepalive_timeout_s
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.closing = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, backlog: int, reuse_port: bool) -> None:
        self._server = await self.loop.create_server(
            lambda: HttpProtocol(self), host, port, backlog=backlog, reuse_port=reuse_port
        )

    @property
    def addresses(self) -> list[Any]:
        assert self._server is not None
        return [s.getsockname() for s in self._server.sockets]

    def stop_accepting(self) -> None:
        """No new connections; idle keep-alive ones are closed."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    async def close(self, timeout_s: float) -> None:
        """Ends what is left: cancels the requests still in flight after
        ``timeout_s``, and closes every connection."""
        self.stop_accepting()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
