"""Conformance of the lean HTTP/1.1 upstream client (llmproxy/upstream/h1.py).

Each test runs a raw-socket server on 127.0.0.1 (port 0), written here, so it
controls the exact bytes and their timing. The tests pin what ``H1Client`` does
with those bytes: framing (Content-Length, chunked, read until close, 204/304,
HEAD, 1xx), keep-alive reuse, connections the server closes or resets at each
stage, header limits, malformed answers, request serialization, cancellation,
back-pressure and the ``Response`` read API.

Nothing sleeps to wait for a condition. The tests wait on events set by the
server handlers, and every wait has a deadline (``within``), so a bug fails a
test instead of hanging it. The async tests run on asyncio's loop
(pytest-asyncio, auto mode). ``test_on_uvloop`` runs them all again on uvloop,
the gateway's loop in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import pytest
from multidict import CIMultiDict
from yarl import URL

from llmproxy.upstream.h1 import (
    HIGH_WATER,
    MAX_HEADER_BYTES,
    ConnectError,
    Disconnected,
    H1Client,
    Origin,
    ProtocolError,
    Response,
    UpstreamError,
)

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
#: The longest any single wait may take before the test fails.
DEADLINE_S = 5.0
#: The most one socket read hands over: asyncio's selector loop and uvloop both read <= 256 KiB.
MAX_RECV = 256 * KiB


async def within(aw: Awaitable[T], seconds: float = DEADLINE_S) -> T:
    """``await aw``; fail (TimeoutError) after ``seconds`` instead of hanging."""
    async with asyncio.timeout(seconds):
        return await aw


# -- the raw server ---------------------------------------------------------------


@dataclass
class Request:
    """One request as the server received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # the exact bytes: head and body


class Peer:
    """One accepted connection, as the server sees it."""

    def __init__(
        self, server: Server, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.index = index  # 1 for the first connection accepted, 2 for the next...
        self.reader = reader
        self.writer = writer
        #: Set when the handler has returned (for ``keep_alive``: the client closed).
        self.finished = asyncio.Event()

    async def request(self) -> Request | None:
        """The next request on this connection; None if the client closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise AssertionError(f"the client sent a truncated head: {exc.partial!r}") from exc
            return None
        except ConnectionError:
            return None
        lines = head[:-4].decode("utf-8", "surrogateescape").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = [(n, v) for n, _, v in (line.partition(": ") for line in lines[1:])]
        lengths = [v for n, v in headers if n.lower() == "content-length"]
        body = await self.reader.readexactly(int(lengths[0])) if lengths else b""
        req = Request(method, target, version, headers, body, head + body)
        self.server.requests.append(req)
        return req

    async def send(self, data: bytes) -> bool:
        """Write and drain; False if the client had already gone."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def close(self) -> None:
        """A clean close: FIN."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    def reset(self) -> None:
        """An abortive close: SO_LINGER 0, so the kernel sends RST."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def closed_by_client(self) -> bytes:
        """Wait until the client closes (EOF or RST); what it sent until then."""
        try:
            return await self.reader.read()
        except ConnectionError:
            return b""


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """``asyncio.start_server`` on 127.0.0.1:0 that runs ``handler`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.peers: list[Peer] = []
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.origin = Origin("http", "127.0.0.1", 0)

    @property
    def connections(self) -> int:
        """How many connections the server has accepted."""
        return len(self.peers)

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.origin = Origin("http", "127.0.0.1", port)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, len(self.peers) + 1, reader, writer)
        self.peers.append(peer)
        try:
            await self._handler(peer)
        except asyncio.CancelledError:
            # Torn down by __aexit__: end normally (3.11's start_server logs
            # an error for a callback task that ends cancelled).
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            peer.finished.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await within(asyncio.gather(*self._tasks, return_exceptions=True))
        await within(self._server.wait_closed())
        if exc is None and self.errors:
            raise self.errors[0]


@contextlib.asynccontextmanager
async def h1(**kwargs: Any) -> AsyncIterator[H1Client]:
    client = H1Client(**kwargs)
    try:
        yield client
    finally:
        await client.close()


# -- bytes on the wire ----------------------------------------------------------------


def head(status: str = "200 OK", *headers: str, version: str = "HTTP/1.1") -> bytes:
    """A response head, exactly these header lines (no framing header added)."""
    return "\r\n".join([f"{version} {status}", *headers, "", ""]).encode("latin-1")


def ok(
    body: bytes = b"ok", *headers: str, status: str = "200 OK", version: str = "HTTP/1.1"
) -> bytes:
    """A whole response framed by Content-Length."""
    return head(status, *headers, f"Content-Length: {len(body)}", version=version) + body


def chunk(data: bytes, ext: str = "") -> bytes:
    return f"{len(data):x}{ext}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"
CHUNKED = "Transfer-Encoding: chunked"


async def keep_alive(peer: Peer) -> None:
    """Answer every request on the connection with '<connection index> <target>'."""
    while (req := await peer.request()) is not None:
        await peer.send(ok(f"{peer.index} {req.target}".encode()))


# -- the client side ----------------------------------------------------------------


async def get(client: H1Client, origin: Origin, target: str = "/", **kwargs: Any) -> Response:
    return await within(client.request("GET", origin, target, CIMultiDict(), **kwargs))


async def fetch(client: H1Client, origin: Origin, target: str = "/") -> bytes:
    """GET, read the body to its end, release the connection; the body."""
    resp = await get(client, origin, target)
    body = await within(resp.read())
    resp.release()
    return body


# -- framing -----------------------------------------------------------------------


async def test_content_length_body() -> None:
    async with Server(keep_alive) as srv, h1() as client:
        resp = await get(client, srv.origin, "/small")
        assert (resp.status, resp.reason) == (200, "OK")
        assert resp.content_length == len(b"1 /small")
        assert resp.headers["Content-Length"] == "8"
        assert await within(resp.read()) == b"1 /small"
        assert resp.complete
        assert await within(resp.read_any()) == b""
        assert await within(resp.read_any()) == b""  # still the end
        resp.release()
        assert client.idle_connections(srv.origin) == 1


def in_pieces(data: bytes) -> Handler:
    """A handler answering ``data`` with a Content-Length, sent 64 KiB a write."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", f"Content-Length: {len(data)}"))
        for i in range(0, len(data), 64 * KiB):
            await peer.send(data[i : i + 64 * KiB])
        await keep_alive(peer)

    return handler


async def test_large_content_length_body_in_many_pieces_under_back_pressure() -> None:
    data = random.Random(5).randbytes(5 * MiB)

    async with Server(in_pieces(data)) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.content_length == len(data)
        pieces = []
        while piece := await within(resp.read_any()):
            pieces.append(piece)
            # A slow consumer (not a wait for a condition): let the socket
            # deliver more than HIGH_WATER before the next read.
            for _ in range(20):
                await asyncio.sleep(0)
        body = b"".join(pieces)
        assert len(body) == len(data)
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        assert resp.complete
        sizes = [len(p) for p in pieces]
        # The buffer filled up to the pause point, and reading stopped there.
        assert max(sizes) > HIGH_WATER, sizes
        assert max(sizes) <= HIGH_WATER + MAX_RECV, sizes
        assert len(pieces) >= len(data) // (HIGH_WATER + MAX_RECV)
        resp.release()
        # Read to its end: the connection (and its resumed reading) is reused.
        assert client.idle_connections(srv.origin) == 1
        assert await fetch(client, srv.origin, "/next") == b"1 /next"


async def test_splicing_resumes_a_read_paused_before_it_began() -> None:
    """Bytes that piled up past HIGH_WATER before the relay began paused the
    read; the first delivery to a sink with room must resume it."""
    data = random.Random(6).randbytes(2 * MiB)

    async with Server(in_pieces(data)) as srv, h1() as client:
        resp = await get(client, srv.origin)
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while resp._buffered <= HIGH_WATER:  # poll: the socket fills the buffer
            assert asyncio.get_running_loop().time() < deadline, resp._buffered
            await asyncio.sleep(0.001)
        pieces: list[bytes] = []

        def sink(piece: bytes) -> bool:
            pieces.append(piece)
            return True

        async def drain() -> None:
            raise AssertionError("a sink with room is never drained")

        await within(resp.splice(sink, drain))
        body = b"".join(pieces)
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        resp.release()
        assert client.idle_connections(srv.origin) == 1


def one_chunk_per_read(chunks: int, sent: asyncio.Queue[None]) -> Handler:
    """A chunked body whose chunks go out one at a time, each only when the
    test asks for it (``sent``): every chunk arrives in a read of its own, as
    a replica's SSE events do."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", CHUNKED))
        for i in range(chunks):
            await sent.get()
            await peer.send(chunk(b"event %d\n\n" % i))
        await sent.get()
        await peer.send(LAST_CHUNK)
        await keep_alive(peer)

    return handler


async def test_a_sink_without_room_pauses_reading_until_drained() -> None:
    """Each chunk that finds the sink full pauses reading the upstream until
    the relay has drained (a slow client holds the replica back)."""
    more: asyncio.Queue[None] = asyncio.Queue()
    async with Server(one_chunk_per_read(3, more)) as srv, h1() as client:
        resp = await get(client, srv.origin)
        pieces: list[bytes] = []
        paused_at_drain: list[bool] = []

        def sink(piece: bytes) -> bool:
            pieces.append(piece)
            return False  # no room, every time

        async def drain() -> None:
            paused_at_drain.append(resp._conn._paused)
            more.put_nowait(None)  # the next chunk (or the end) once drained

        more.put_nowait(None)
        await within(resp.splice(sink, drain))
        assert pieces == [b"event %d\n\n" % i for i in range(3)]
        assert paused_at_drain == [True, True, True]
        resp.release()
        assert client.idle_connections(srv.origin) == 1


async def test_a_sink_that_raises_ends_the_splice_with_its_error() -> None:
    more: asyncio.Queue[None] = asyncio.Queue()
    async with Server(one_chunk_per_read(3, more)) as srv, h1() as client:
        resp = await get(client, srv.origin)
        pieces: list[bytes] = []

        def sink(piece: bytes) -> bool:
            pieces.append(piece)
            if len(pieces) == 2:
                raise RuntimeError("a bug in the sink")
            more.put_nowait(None)
            return True

        async def drain() -> None:
            raise AssertionError("a sink with room is never drained")

        more.put_nowait(None)
        with pytest.raises(RuntimeError, match="a bug in the sink"):
            await within(resp.splice(sink, drain))
        assert pieces == [b"event 0\n\n", b"event 1\n\n"]
        resp.release()  # not read to its end: the connection is not reused
        assert client.idle_connections(srv.origin) == 0


async def test_chunked_body_of_many_chunks() -> None:
    parts = [bytes([65 + i % 26]) * (i % 97 + 1) for i in range(1000)]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", CHUNKED))
        for group in range(0, len(parts), 100):  # ten writes of a hundred chunks
            await peer.send(b"".join(chunk(p) for p in parts[group : group + 100]))
        await peer.send(LAST_CHUNK)
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.content_length is None
        assert await within(resp.read()) == b"".join(parts)
        assert resp.complete
        resp.release()
        assert await fetch(client, srv.origin, "/next") == b"1 /next"
        assert srv.connections == 1


async def test_chunk_extensions_are_ignored() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        body = chunk(b"hello", ";name=value") + chunk(b" world", ';a="quoted";b') + LAST_CHUNK
        await peer.send(head("200 OK", CHUNKED) + body)
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert await within(resp.read()) == b"hello world"
        assert resp.complete
        resp.release()
        assert await fetch(client, srv.origin, "/next") == b"1 /next"


async def test_chunked_trailers_end_the_body() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        trailers = b"0\r\nX-Checksum: abc\r\nX-Count: 2\r\n\r\n"
        await peer.send(head("200 OK", CHUNKED, "Trailer: X-Checksum, X-Count"))
        await peer.send(chunk(b"ab") + chunk(b"cd") + trailers)
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert await within(resp.read()) == b"abcd"
        assert resp.complete
        resp.release()
        assert client.idle_connections(srv.origin) == 1
        assert await fetch(client, srv.origin, "/next") == b"1 /next"
        assert srv.connections == 1


async def test_trailers_do_not_leak_into_the_response_headers() -> None:
    """RFC 9110 §6.5.1: trailer fields are not merged into the header section."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        body = chunk(b"ab") + b"0\r\nX-Checksum: abc\r\n\r\n"
        await peer.send(head("200 OK", CHUNKED, "Trailer: X-Checksum") + body)
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        headers_at_head = list(resp.headers.items())
        assert await within(resp.read()) == b"ab"
        assert list(resp.headers.items()) == headers_at_head
        assert "X-Checksum" not in resp.headers


async def test_body_delimited_by_connection_close() -> None:
    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(head("200 OK", "Content-Type: text/plain") + b"first ")
        await peer.send(b"second ")
        await peer.send(b"third")
        await peer.close()

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.content_length is None
        assert await within(resp.read()) == b"first second third"
        assert resp.complete
        resp.release()
        assert client.idle_connections(srv.origin) == 0
        assert client.open_connections(srv.origin) == 0
        assert await fetch(client, srv.origin, "/next") == b"2 /next"
        assert srv.connections == 2


async def test_204_and_304_have_no_body() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("204 No Content", "X-A: 1"))
        await peer.request()
        # A 304 may carry the Content-Length of the representation: no body follows.
        await peer.send(head("304 Not Modified", 'ETag: "v1"', "Content-Length: 1234"))
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin, "/204")
        assert (resp.status, resp.headers["X-A"]) == (204, "1")
        assert resp.complete
        assert await within(resp.read()) == b""
        resp.release()
        resp = await get(client, srv.origin, "/304")
        assert (resp.status, resp.headers["ETag"]) == (304, '"v1"')
        assert resp.complete
        assert await within(resp.read()) == b""
        resp.release()
        # The parser took no bytes of the next response as a body.
        assert await fetch(client, srv.origin, "/next") == b"1 /next"
        assert srv.connections == 1


async def test_content_length_zero() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b""))
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.content_length == 0
        assert resp.complete
        assert await within(resp.read()) == b""
        resp.release()
        assert client.idle_connections(srv.origin) == 1
        assert await fetch(client, srv.origin, "/next") == b"1 /next"
        assert srv.connections == 1


# -- keep-alive ------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection() -> None:
    async with Server(keep_alive) as srv, h1() as client:
        origin = srv.origin
        assert (client.idle_connections(origin), client.open_connections(origin)) == (0, 0)
        resp = await get(client, origin, "/a")
        assert (client.idle_connections(origin), client.open_connections(origin)) == (0, 1)
        assert await within(resp.read()) == b"1 /a"
        resp.release()
        assert (client.idle_connections(origin), client.open_connections(origin)) == (1, 1)
        resp = await get(client, origin, "/b")
        assert (client.idle_connections(origin), client.open_connections(origin)) == (0, 1)
        assert await within(resp.read()) == b"1 /b"
        resp.release()
        assert (client.idle_connections(origin), client.open_connections(origin)) == (1, 1)
        assert srv.connections == 1
        assert srv.targets == ["/a", "/b"]


async def test_concurrent_requests_open_two_connections_and_max_idle_is_kept() -> None:
    async with Server(keep_alive) as srv, h1(max_idle_per_origin=1) as client:
        first, second = await asyncio.gather(
            get(client, srv.origin, "/a"), get(client, srv.origin, "/b")
        )
        assert client.open_connections(srv.origin) == 2
        assert await within(first.read()) == b"1 /a"
        assert await within(second.read()) == b"2 /b"
        first.release()
        second.release()  # one idle connection too many: the oldest one is closed
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (1, 1)
        await within(srv.peers[0].finished.wait())
        assert await fetch(client, srv.origin, "/c") == b"2 /c"
        assert srv.connections == 2


async def test_connection_close_from_the_server_is_not_reused() -> None:
    saw_eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(ok(b"bye", "Connection: close"))
        assert await peer.closed_by_client() == b""  # the server does not close: the client does
        saw_eof.set()

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"bye"
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        await within(saw_eof.wait())
        assert await fetch(client, srv.origin, "/b") == b"2 /b"
        assert srv.connections == 2


async def test_http_1_0_response_is_not_reused() -> None:
    saw_eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(ok(b"old", version="HTTP/1.0"))
        assert await peer.closed_by_client() == b""
        saw_eof.set()

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin, "/a")
        assert resp.status == 200
        assert await within(resp.read()) == b"old"
        resp.release()
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        await within(saw_eof.wait())
        assert await fetch(client, srv.origin, "/b") == b"2 /b"
        assert srv.connections == 2


async def test_release_before_the_end_of_the_body_closes_the_connection() -> None:
    saw_eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(head("200 OK", "Content-Length: 100") + b"0123456789")
        await peer.closed_by_client()
        saw_eof.set()

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin, "/a")
        assert await within(resp.read(5)) == b"01234"
        assert not resp.complete
        resp.release()
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        await within(saw_eof.wait())
        assert await fetch(client, srv.origin, "/b") == b"2 /b"
        assert srv.connections == 2


async def test_release_of_a_complete_but_unread_body_closes_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin, "/a")
        assert resp.complete  # the whole body arrived with the head...
        resp.release()  # ...but was never read: the caller did not finish with it
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        await within(srv.peers[0].finished.wait())
        assert await fetch(client, srv.origin, "/b") == b"2 /b"


async def test_response_close_is_seen_by_the_server_promptly() -> None:
    """How the gateway cancels a generation: the replica sees the connection end."""
    saw_eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", CHUNKED, "Content-Type: text/event-stream"))
        await peer.send(chunk(b"data: 1\n\n"))
        assert await peer.closed_by_client() == b""
        saw_eof.set()

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert await within(resp.read_any()) == b"data: 1\n\n"
        t0 = time.monotonic()
        resp.close()
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        await within(saw_eof.wait(), 2.0)
        assert time.monotonic() - t0 < 1.0


# -- connections the server closed ----------------------------------------------


async def _idle_connection_closed_by_server(close: Callable[[Peer], Awaitable[None]]) -> None:
    closed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(ok(b"first"))
        await close(peer)
        closed.set()

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"first"
        await within(closed.wait())
        # Whether or not the client has noticed the close yet, no error surfaces.
        assert await fetch(client, srv.origin, "/b") == b"2 /b"
        assert srv.connections == 2
        assert srv.targets == ["/a", "/b"]
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (1, 1)


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    await _idle_connection_closed_by_server(Peer.close)


async def test_idle_connection_reset_by_the_server_is_replaced() -> None:
    async def reset(peer: Peer) -> None:
        peer.reset()

    await _idle_connection_closed_by_server(reset)


async def test_request_on_a_connection_closed_unanswered_is_retried_once() -> None:
    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(ok(b"first"))
        assert await peer.request() is not None
        await peer.close()  # the keep-alive race: closed as the request arrived

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"first"
        assert await fetch(client, srv.origin, "/b") == b"2 /b"
        assert srv.targets == ["/a", "/b", "/b"]
        assert srv.connections == 2


async def test_retry_on_a_fresh_connection_is_not_repeated() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if peer.index == 1:
            await peer.send(ok(b"first"))
            await peer.request()
        await peer.close()

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"first"
        with pytest.raises(Disconnected):
            await get(client, srv.origin, "/b")
        assert srv.targets == ["/a", "/b", "/b"]
        assert srv.connections == 2
        assert client.open_connections(srv.origin) == 0


async def test_fresh_connection_closed_without_an_answer_raises() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.close()

    async with Server(handler) as srv, h1() as client:
        with pytest.raises(Disconnected):
            await get(client, srv.origin, "/a")
        assert srv.connections == 1
        assert srv.targets == ["/a"]
        assert client.open_connections(srv.origin) == 0


async def test_partial_answer_on_a_reused_connection_is_not_retried() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        await peer.close()

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"first"
        with pytest.raises(Disconnected):
            await get(client, srv.origin, "/b")
        assert srv.connections == 1  # bytes came back: the request may have run
        assert client.open_connections(srv.origin) == 0


# -- HEAD and 1xx ---------------------------------------------------------------------


async def test_head_response_has_no_body_and_the_next_request_works() -> None:
    async def handler(peer: Peer) -> None:
        while (req := await peer.request()) is not None:
            if req.method == "HEAD":
                await peer.send(head("200 OK", "Content-Length: 1000", "Content-Type: text/plain"))
            else:
                await peer.send(ok(f"{peer.index} {req.target}".encode()))

    async with Server(handler) as srv, h1() as client:
        resp = await within(client.request("HEAD", srv.origin, "/h", CIMultiDict()))
        assert resp.status == 200
        assert resp.content_length == 1000
        assert resp.content_type == "text/plain"
        assert resp.complete
        assert await within(resp.read()) == b""
        assert await within(resp.read_any()) == b""
        resp.release()
        assert await fetch(client, srv.origin, "/next") == b"2 /next"
        # A connection that answered HEAD is never reused (the parser would want a body).
        assert srv.connections == 2
        assert [r.method for r in srv.requests] == ["HEAD", "GET"]


async def test_informational_responses_are_skipped() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            head("100 Continue")
            + head("103 Early Hints", "Link: </style.css>; rel=preload")
            + ok(b"final", "X-Final: yes", status="201 Created")
        )
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert (resp.status, resp.reason) == (201, "Created")
        assert sorted(resp.headers.items()) == [("Content-Length", "5"), ("X-Final", "yes")]
        assert await within(resp.read()) == b"final"
        resp.release()
        assert await fetch(client, srv.origin, "/next") == b"1 /next"
        assert srv.connections == 1


async def test_informational_responses_in_separate_writes_are_skipped() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("100 Continue"))
        await peer.send(head("103 Early Hints", "Link: </a.js>; rel=preload"))
        await peer.send(head("200 OK", "Content-Length: 5", "X-Final: yes"))
        await peer.send(b"final")
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert (resp.status, resp.reason) == (200, "OK")
        assert "Link" not in resp.headers
        assert resp.headers["X-Final"] == "yes"
        assert await within(resp.read()) == b"final"
        resp.release()
        assert await fetch(client, srv.origin, "/next") == b"1 /next"


async def test_unasked_101_switching_protocols_is_a_protocol_error() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            head("101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade")
        )
        await peer.send(b"\x81\x05hello")  # the other protocol's bytes
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        with pytest.raises(ProtocolError):
            await get(client, srv.origin)
        assert client.open_connections(srv.origin) == 0


# -- headers --------------------------------------------------------------------


async def test_head_just_under_the_limit_is_accepted() -> None:
    big = "v" * (MAX_HEADER_BYTES - 1 * KiB)

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"ok", f"X-Big: {big}"))
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.headers["X-Big"] == big
        assert await within(resp.read()) == b"ok"
        resp.release()
        assert await fetch(client, srv.origin, "/next") == b"1 /next"


async def test_head_over_the_limit_is_a_protocol_error() -> None:
    one_header = [f"X-Big: {'v' * (MAX_HEADER_BYTES + 1)}"]
    many_headers = [f"X-H{i}: {'v' * KiB}" for i in range(MAX_HEADER_BYTES // KiB + 1)]

    async def handler(peer: Peer) -> None:
        await peer.request()
        lines = one_header if peer.index == 1 else many_headers
        await peer.send(ok(b"ok", *lines))
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        for _ in range(2):
            with pytest.raises(ProtocolError, match="larger than"):
                await get(client, srv.origin)
            assert client.open_connections(srv.origin) == 0
        assert srv.connections == 2


async def test_unterminated_head_over_the_limit_is_a_protocol_error_promptly() -> None:
    """A header line that never ends must not be buffered without bound."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(16):  # 1 MiB of one header value, no CRLF
            if not await peer.send(b"v" * (64 * KiB)):
                break
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        with pytest.raises(ProtocolError, match="larger than"):
            await within(client.request("GET", srv.origin, "/", CIMultiDict()), 1.0)
        assert client.open_connections(srv.origin) == 0


async def test_many_headers() -> None:
    lines = [f"X-H-{i}: value {i}" for i in range(200)]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"ok", *lines))

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert len(resp.headers) == 201
        assert [resp.headers[f"x-h-{i}"] for i in range(200)] == [f"value {i}" for i in range(200)]
        assert list(resp.headers)[:3] == ["X-H-0", "X-H-1", "X-H-2"]  # order and case kept


async def test_repeated_headers_are_kept_apart() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            ok(
                b"ok",
                "Set-Cookie: a=1",
                "Vary: Accept",
                "set-cookie: b=2; Path=/",
                "Set-Cookie: c=3",
            )
        )

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2; Path=/", "c=3"]
        assert resp.headers["Vary"] == "Accept"


# -- malformed and unsolicited --------------------------------------------------


async def test_malformed_status_line_is_a_protocol_error() -> None:
    answers = [b"HTTP/1.1 2OO OK\r\n\r\n", b"SSH-2.0-OpenSSH_9.6\r\n", b"\x16\x03\x01\x02\x00\x01"]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answers[peer.index - 1])
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        for _ in answers:
            with pytest.raises(ProtocolError):
                await get(client, srv.origin)
            assert client.open_connections(srv.origin) == 0
        assert srv.connections == len(answers)  # a ProtocolError is never retried


async def test_invalid_content_length_is_a_protocol_error() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", "Content-Length: 12abc") + b"hello")
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        with pytest.raises(ProtocolError):
            await get(client, srv.origin)
        assert client.open_connections(srv.origin) == 0


async def test_unsolicited_bytes_on_an_idle_connection_discard_it() -> None:
    idle = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        await peer.send(ok(b"first"))
        await idle.wait()
        await peer.send(ok(b"nobody asked"))
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"first"
        assert client.idle_connections(srv.origin) == 1
        idle.set()
        await within(srv.peers[0].finished.wait())  # the client closed it
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        assert await fetch(client, srv.origin, "/b") == b"2 /b"


async def test_bytes_after_the_response_in_the_same_segment_discard_the_connection() -> None:
    """A second response glued to the first is not parsed into it, nor kept."""

    async def handler(peer: Peer) -> None:
        if peer.index > 1:
            await keep_alive(peer)
            return
        await peer.request()
        extra = ok(b"", "X-Smuggled: 1", status="404 Not Found")
        await peer.send(ok(b"first", "X-First: 1") + extra)
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin, "/a")
        assert await within(resp.read()) == b"first"
        assert sorted(resp.headers.items()) == [("Content-Length", "5"), ("X-First", "1")]
        resp.release()
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        assert await fetch(client, srv.origin, "/b") == b"2 /b"


# -- failures at every stage --------------------------------------------------------


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port bound but not listening: a connect is refused (RST), deterministically."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextlib.contextmanager
def blackhole_port() -> Iterator[int]:
    """A listener whose accept queue is full: Linux drops further SYNs, a connect hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        probe = socket.socket()
        fillers.append(probe)
        probe.settimeout(0.05)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass  # the SYN was dropped: what the test needs
        else:
            pytest.skip("this kernel completes connects to a full accept queue")
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_refused_connect_is_a_connect_error() -> None:
    with closed_port() as port:
        origin = Origin("http", "127.0.0.1", port)
        async with h1() as client:
            with pytest.raises(ConnectError, match="cannot connect"):
                await get(client, origin)
            assert client.open_connections(origin) == 0


async def test_connect_timeout_is_a_connect_error() -> None:
    with blackhole_port() as port:
        origin = Origin("http", "127.0.0.1", port)
        async with h1() as client:
            t0 = time.monotonic()
            with pytest.raises(ConnectError, match=r"timed out after 0\.2s"):
                await get(client, origin, connect_timeout=0.2)
            assert 0.19 <= time.monotonic() - t0 < 2.0
            assert client.open_connections(origin) == 0


async def test_kernel_connect_timeout_without_a_limit_is_a_connect_error() -> None:
    """The kernel gives up (ETIMEDOUT, a TimeoutError) with no connect_timeout set."""
    loop = asyncio.get_running_loop()

    async def kernel_timed_out(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "create_connection", kernel_timed_out)
        async with h1() as client:
            with pytest.raises(ConnectError):
                await get(client, Origin("http", "127.0.0.1", 9), connect_timeout=None)


async def _reset_before_the_head(stage: Handler) -> None:
    async with Server(stage) as srv, h1() as client:
        with pytest.raises(Disconnected):
            await get(client, srv.origin)
        assert srv.connections == 1
        assert client.open_connections(srv.origin) == 0


async def test_reset_right_after_accept() -> None:
    async def handler(peer: Peer) -> None:
        peer.reset()

    await _reset_before_the_head(handler)


async def test_reset_after_reading_the_request() -> None:
    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        peer.reset()

    await _reset_before_the_head(handler)


async def test_reset_after_a_partial_status_line() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 20")
        peer.reset()

    await _reset_before_the_head(handler)


async def test_close_after_a_partial_head() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")
        await peer.close()

    await _reset_before_the_head(handler)


async def _cut_mid_body(
    first: bytes, end: Callable[[Peer], Awaitable[None]], *, read_pieces: bool
) -> None:
    """The server sends ``first`` (head and part of the body) then ends the connection."""
    got_head = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(first)
        await got_head.wait()
        await end(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.status == 200
        got_head.set()
        if read_pieces:
            partial = await within(resp.read_any())
            assert partial == b"0123456789"  # it came with the head
            with pytest.raises(Disconnected):
                await within(resp.read_any())
            with pytest.raises(Disconnected):  # and it stays an error
                await within(resp.read_any())
        else:
            with pytest.raises(Disconnected):
                await within(resp.read())
        assert not resp.complete
        resp.release()
        assert client.open_connections(srv.origin) == 0


async def _reset(peer: Peer) -> None:
    peer.reset()


CL_CUT = head("200 OK", "Content-Length: 100") + b"0123456789"
CHUNK_CUT = head("200 OK", CHUNKED) + b"20\r\n0123456789"
EOF_CUT = head("200 OK", "Content-Type: text/plain") + b"0123456789"


async def test_reset_mid_content_length_body() -> None:
    await _cut_mid_body(CL_CUT, _reset, read_pieces=True)


async def test_reset_mid_chunk() -> None:
    await _cut_mid_body(CHUNK_CUT, _reset, read_pieces=False)


async def test_reset_mid_body_delimited_by_close() -> None:
    """A reset is not the clean end of a read-until-close body."""
    await _cut_mid_body(EOF_CUT, _reset, read_pieces=True)


async def test_close_mid_content_length_body_is_not_a_short_body() -> None:
    await _cut_mid_body(CL_CUT, Peer.close, read_pieces=False)


async def test_close_mid_chunk_is_not_a_short_body() -> None:
    await _cut_mid_body(CHUNK_CUT, Peer.close, read_pieces=True)


async def test_close_between_chunks_is_not_a_short_body() -> None:
    cut = head("200 OK", CHUNKED) + chunk(b"0123456789")
    await _cut_mid_body(cut, Peer.close, read_pieces=True)


# -- request serialization ----------------------------------------------------------


async def test_request_is_serialized_exactly() -> None:
    body = bytes(range(256)) * 4 + "é€ 日本".encode()
    async with Server(keep_alive) as srv, h1() as client:
        headers = CIMultiDict(
            [
                ("Content-Type", "application/octet-stream"),
                ("X-Dup", "1"),
                ("X-Dup", "2"),
                ("X-Name", "café"),
            ]
        )
        resp = await within(
            client.request("POST", srv.origin, "/v1/chat/completions?x=1&y=%20", headers, body)
        )
        assert await within(resp.read()) == b"1 /v1/chat/completions?x=1&y=%20"
        resp.release()
        port = srv.origin.port
        assert srv.requests[0].raw == (
            b"POST /v1/chat/completions?x=1&y=%20 HTTP/1.1\r\n"
            + f"Host: 127.0.0.1:{port}\r\n".encode()
            + b"Content-Type: application/octet-stream\r\n"
            + b"X-Dup: 1\r\nX-Dup: 2\r\n"
            + b"X-Name: caf\xc3\xa9\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"\r\n"
            + body
        )
        assert srv.requests[0].body == body


async def test_content_length_is_sent_when_the_method_or_body_needs_it() -> None:
    cases = [
        ("GET", b"", None),
        ("DELETE", b"", None),
        ("OPTIONS", b"", None),
        ("POST", b"", "0"),
        ("PUT", b"", "0"),
        ("PATCH", b"", "0"),
        ("POST", b"{}", "2"),
        ("GET", b"abc", "3"),
    ]
    async with Server(keep_alive) as srv, h1() as client:
        for method, body, _ in cases:
            resp = await within(
                client.request(method, srv.origin, "/m", CIMultiDict({"Accept": "*/*"}), body)
            )
            assert await within(resp.read()) == b"1 /m"
            resp.release()
        port = srv.origin.port
        for (method, body, length), req in zip(cases, srv.requests, strict=True):
            assert (req.method, req.target, req.version) == (method, "/m", "HTTP/1.1")
            expected = [("Host", f"127.0.0.1:{port}"), ("Accept", "*/*")]
            if length is not None:
                expected.append(("Content-Length", length))
            assert req.headers == expected, method
            assert req.body == body
        assert srv.connections == 1


async def test_cr_or_lf_in_the_head_is_refused_and_nothing_is_sent() -> None:
    bad: list[tuple[str, CIMultiDict[str]]] = [
        ("/", CIMultiDict({"X-A": "a\r\nX-Injected: 1"})),
        ("/", CIMultiDict({"X-A": "a\nb"})),
        ("/", CIMultiDict({"X-A": "a\rb"})),
        ("/", CIMultiDict({"X-A\r\nX-Injected": "1"})),
        ("/a HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /b", CIMultiDict()),
    ]
    async with Server(keep_alive) as srv, h1() as client:
        for target, headers in bad:
            with pytest.raises(UpstreamError) as info:
                await within(client.request("GET", srv.origin, target, headers))
            assert type(info.value) is UpstreamError
        assert client.open_connections(srv.origin) == 0
        assert await fetch(client, srv.origin, "/ok") == b"1 /ok"
        assert srv.connections == 1
        assert srv.targets == ["/ok"]
        assert b"Injected" not in srv.requests[0].raw


def test_origin_and_host_header() -> None:
    assert Origin.of(URL("http://example.com/x")) == Origin("http", "example.com", 80)
    assert Origin.of(URL("https://example.com")) == Origin("https", "example.com", 443)
    assert Origin.of(URL("http://127.0.0.1:8000")) == Origin("http", "127.0.0.1", 8000)
    assert Origin("http", "example.com", 80).host_header == "example.com"
    assert Origin("https", "example.com", 443).host_header == "example.com"
    assert Origin("http", "example.com", 443).host_header == "example.com:443"
    assert Origin("https", "example.com", 80).host_header == "example.com:80"
    assert Origin("http", "::1", 8080).host_header == "[::1]:8080"
    assert Origin("http", "::1", 80).host_header == "[::1]"
    with pytest.raises(ValueError, match="not an http"):
        Origin.of(URL("ftp://example.com"))


# -- cancellation ---------------------------------------------------------------


async def test_cancelling_a_request_closes_its_connection() -> None:
    got_request = asyncio.Event()
    saw_eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        got_request.set()
        assert await peer.closed_by_client() == b""  # never answered
        saw_eof.set()

    async with Server(handler) as srv, h1() as client:
        task = asyncio.create_task(client.request("GET", srv.origin, "/", CIMultiDict()))
        await within(got_request.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        await within(saw_eof.wait())
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)


async def test_cancelling_a_request_on_a_reused_connection_closes_it() -> None:
    got_second = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()
        got_second.set()
        await peer.closed_by_client()

    async with Server(handler) as srv, h1() as client:
        assert await fetch(client, srv.origin, "/a") == b"first"
        task = asyncio.create_task(client.request("GET", srv.origin, "/b", CIMultiDict()))
        await within(got_second.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        await within(srv.peers[0].finished.wait())
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        assert srv.connections == 1


# -- the read API ---------------------------------------------------------------


async def test_read_with_a_limit() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"0123456789"))
        await keep_alive(peer)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert await within(resp.read(3)) == b"012"
        assert await within(resp.read(0)) == b""
        assert await within(resp.read(4)) == b"3456"
        assert await within(resp.read_any()) == b"789"
        assert await within(resp.read(5)) == b""
        assert await within(resp.read()) == b""
        resp.release()
        assert client.idle_connections(srv.origin) == 1  # the limit lost nothing


async def test_read_with_a_limit_across_arrivals() -> None:
    go = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", CHUNKED) + chunk(b"abc"))
        await go.wait()
        await peer.send(chunk(b"defgh") + chunk(b"ij") + LAST_CHUNK)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        reading = asyncio.create_task(resp.read(5))
        go.set()
        assert await within(reading) == b"abcde"
        assert await within(resp.read(100)) == b"fghij"
        assert resp.complete
        assert await within(resp.read_any()) == b""


async def test_read_any_hands_over_bytes_as_they_arrive() -> None:
    go = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head("200 OK", CHUNKED, "Content-Type: text/event-stream; charset=utf-8"))
        await peer.send(chunk(b"data: one\n\n"))
        await go.wait()
        await peer.send(chunk(b"data: two\n\n") + LAST_CHUNK)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert resp.content_type == "text/event-stream"
        assert await within(resp.read_any()) == b"data: one\n\n"
        assert not resp.complete
        go.set()
        assert await within(resp.read_any()) == b"data: two\n\n"
        assert await within(resp.read_any()) == b""
        assert resp.complete


async def test_read_any_coalesces_chunks_that_arrived_together() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        chunks = b"".join(chunk(c) for c in (b"one ", b"two ", b"three"))
        await peer.send(head("200 OK", CHUNKED) + chunks + LAST_CHUNK)

    async with Server(handler) as srv, h1() as client:
        resp = await get(client, srv.origin)
        assert await within(resp.read_any()) == b"one two three"
        assert await within(resp.read_any()) == b""


# -- closing the client -------------------------------------------------------------


async def test_client_close_closes_idle_connections() -> None:
    async with Server(keep_alive) as srv:
        client = H1Client()
        try:
            first, second = await asyncio.gather(
                get(client, srv.origin, "/a"), get(client, srv.origin, "/b")
            )
            for resp in (first, second):
                await within(resp.read())
                resp.release()
            assert client.idle_connections(srv.origin) == 2
        finally:
            await client.close()
        await within(asyncio.gather(*(p.finished.wait() for p in srv.peers)))
        assert srv.connections == 2
        assert (client.idle_connections(srv.origin), client.open_connections(srv.origin)) == (0, 0)
        with pytest.raises(UpstreamError, match="closed"):
            await get(client, srv.origin, "/c")
        assert srv.connections == 2


# -- all of the above on uvloop -----------------------------------------------------

#: Tests that patch the loop object (uvloop's cannot be patched).
_ASYNCIO_ONLY = {"test_kernel_connect_timeout_without_a_limit_is_a_connect_error"}
_ASYNC_TESTS: list[Callable[[], Coroutine[Any, Any, None]]] = [
    fn
    for name, fn in list(globals().items())
    if name.startswith("test_") and inspect.iscoroutinefunction(fn) and name not in _ASYNCIO_ONLY
]


@pytest.mark.parametrize("case", _ASYNC_TESTS, ids=lambda fn: str(fn.__name__))
def test_on_uvloop(case: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(case())
