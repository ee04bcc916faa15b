"""The main listener's HTTP/1.1 contract, spoken over raw loopback sockets.

A black box: one gateway process in front of simulated replicas, hand-written
request bytes, and assertions only on what crosses the wire (status line,
headers, body framing, whether the connection is kept or closed) or on what a
replica saw (a generation cancelled, a request never forwarded). Nothing here
depends on which HTTP engine serves the listener: the suite runs once per
engine that ``server.http`` can name (httptools, aiohttp's low-level server).

Where an engine breaks the contract today, the test says what is right and
:data:`DEVIATIONS` marks that engine's run a strict xfail, with the reason:
a fix makes it fail until its entry is removed.

Covered elsewhere, so not here: Expect: 100-continue / 417, the 413 for a body
over the limit, and the JSON shape of PUT / DELETE 405s (``test_gateway.py``).
``test_h1_conformance.py`` is the suite of the upstream client, not of this
listener.

Replies are read with ``loop.sock_recv`` into our own buffer rather than
through an ``asyncio.StreamReader``: a server that answers 400 and closes
with request bytes still unread sends a reset, and a ``StreamReader`` would
then raise before handing over the reply it already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from llmproxy.config.loader import HTTP_SERVERS
from tests.support import Gateway, Sim, wait_for

#: Every read fails after this long instead of hanging the suite.
READ_TIMEOUT_S = 5.0
#: How soon a replica must see the cancellation once the client has left.
CANCEL_DEADLINE_S = 5.0

FAST, SLOW, HUNG = "fast-model", "slow-model", "hung-model"
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
MAX_BODY = 64 * 1024
ALLOW = {"GET", "HEAD", "OPTIONS", "POST"}


# --- the engines and where they fall short -------------------------------------


#: (engine, case) -> how that engine breaks the contract today.
DEVIATIONS: dict[tuple[str, str], str] = {
    ("aiohttp", "close-then-more"): "the valid first request is answered 400 'Data after "
    "`Connection: close`' when another request follows it in the same read",
    ("aiohttp", "traceback-in-log"): "each malformed request (but a garbage first line) "
    "is logged at ERROR with a full traceback: any client can fill the gateway's log",
    ("aiohttp", "1mb-of-fields"): "no bound on the whole head, only on each field "
    "(64 KB) and their number (128): a head of 1 MB is served",
    ("aiohttp", "absolute-form"): "the target stays absolute in raw_path, which the "
    "probes match and the upstream request is sent with: GET http://host/healthz is a 404",
}


def known_deviation(request: pytest.FixtureRequest, servers: Servers, case: str) -> None:
    reason = DEVIATIONS.get((servers.engine, case))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{servers.engine}: {reason}"))


# --- the servers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Servers:
    engine: str
    gateway: Gateway
    #: Answers at once.
    fast: Sim
    #: 20 tokens/s: a long stream stays open for as long as a test needs.
    slow: Sim
    #: Never answers a generation request: a client waits for its first byte.
    hung: Sim


@pytest.fixture(scope="module", params=HTTP_SERVERS)
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    engine: str = request.param
    tmp = tmp_path_factory.mktemp(f"listener-conformance-{engine}")
    with contextlib.ExitStack() as stack:

        def sim(model: str, *args: str) -> Sim:
            s = Sim(tmp, "--model", model, *args, name=model)
            stack.callback(s.stop)
            return s

        fast = sim(FAST, "--ttft-ms", "0", "--tokens-per-s", "0")
        slow = sim(SLOW, "--ttft-ms", "0", "--tokens-per-s", "20")
        hung = sim(HUNG, "--hang")
        pools = {FAST: fast, SLOW: slow, HUNG: hung}
        server: dict[str, Any] = {"max_body_bytes": MAX_BODY, "http": engine}
        config = {
            "pools": {m: {"backends": [{"url": s.url}]} for m, s in pools.items()},
            "routes": [{"name": m, "match": {"model": m}, "pool": m} for m in pools],
            "server": server,
        }
        gateway = Gateway(tmp, config)
        try:
            yield Servers(engine, gateway, fast, slow, hung)
        finally:
            code = gateway.stop()
        assert code == 0, gateway.log()


# --- the raw HTTP/1.1 client -------------------------------------------------


def req(
    method: str,
    target: str = "/healthz",
    *,
    body: bytes | None = None,
    version: str = "1.1",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """One request's bytes; a body gets a JSON Content-Type and a Content-Length."""
    lines = [f"{method} {target} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: gateway")
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return "\r\n".join([*lines, "", ""]).encode() + (body or b"")


def chat_body(model: str = FAST, *, stream: bool = False, max_tokens: int = 3) -> bytes:
    doc = {"model": model, "messages": MESSAGES, "stream": stream, "max_tokens": max_tokens}
    return json.dumps(doc).encode()


def chat(
    model: str = FAST,
    *,
    stream: bool = False,
    max_tokens: int = 3,
    version: str = "1.1",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    body = chat_body(model, stream=stream, max_tokens=max_tokens)
    return req("POST", "/v1/chat/completions", body=body, version=version, headers=headers)


@dataclass(frozen=True, slots=True)
class Reply:
    version: str
    status: int
    #: Names lower-cased, in wire order.
    headers: tuple[tuple[str, str], ...]
    #: De-chunked when the reply was chunked.
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header (Connection, Allow) as a set of lower-cased tokens."""
        return {t.strip().lower() for t in (self.header(name) or "").split(",") if t.strip()}

    @property
    def chunked(self) -> bool:
        return "chunked" in self.tokens("transfer-encoding")

    def json(self) -> Any:
        return json.loads(self.body)


Leave = Literal["fin", "rst"]


class Raw:
    """One client connection. Every read is bounded by ``READ_TIMEOUT_S``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._eof = False
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, url: str) -> Raw:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def send(self, *pieces: bytes) -> None:
        """Each piece in its own send. Loopback usually hands them to the server
        as separate reads; nothing short of sleeping could make sure of it."""
        for piece in pieces:
            await self._loop.sock_sendall(self.sock, piece)

    async def _fill(self) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                data = await self._loop.sock_recv(self.sock, 65536)
        except TimeoutError:
            raise AssertionError(
                f"nothing more from the gateway within {READ_TIMEOUT_S}s; "
                f"unread so far: {bytes(self._buf[:300])!r}"
            ) from None
        except ConnectionResetError:
            data = b""
        if not data:
            self._eof = True
        self._buf += data

    async def _until(self, sep: bytes) -> bytes:
        while (at := self._buf.find(sep)) < 0:
            assert not self._eof, f"closed before {sep!r}; unread: {bytes(self._buf[:300])!r}"
            await self._fill()
        out = bytes(self._buf[:at])
        del self._buf[: at + len(sep)]
        return out

    async def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            assert not self._eof, f"closed after {len(self._buf)} of {n} bytes"
            await self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _rest(self) -> bytes:
        while not self._eof:
            await self._fill()
        out = bytes(self._buf)
        self._buf.clear()
        return out

    async def head(self) -> Reply:
        """The status line and headers of the next reply (interim 1xx included)."""
        raw = await self._until(b"\r\n\r\n")
        status_line, *fields = raw.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version in ("HTTP/1.0", "HTTP/1.1"), status_line
        headers = []
        for field in fields:
            name, sep, value = field.partition(":")
            assert sep, f"header line without a colon: {field!r}"
            assert name == name.strip(), f"space around a header name: {field!r}"
            headers.append((name.lower(), value.strip()))
        return Reply(version, int(status), tuple(headers))

    async def chunk(self) -> bytes:
        """The data of the next chunk of a chunked body; ``b""`` for the last,
        once its trailer section has been read."""
        size_line = await self._until(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            while await self._until(b"\r\n"):
                pass  # a trailer field
            return b""
        data = await self._exactly(size)
        assert await self._exactly(2) == b"\r\n", "chunk data not followed by CRLF"
        return data

    async def reply(self, method: str = "GET") -> Reply:
        """The next whole reply, its body framed as RFC 9112 §6.3 says."""
        head = await self.head()
        if method == "HEAD" or head.status in (204, 304) or head.status < 200:
            return head
        if head.chunked:
            assert head.header("content-length") is None, "both Content-Length and chunked"
            parts = []
            while part := await self.chunk():
                parts.append(part)
            return dataclasses.replace(head, body=b"".join(parts))
        length = head.header("content-length")
        if length is not None:
            return dataclasses.replace(head, body=await self._exactly(int(length)))
        return dataclasses.replace(head, body=await self._rest())

    async def reply_or_close(self) -> Reply | None:
        """The next reply, or ``None`` if the gateway closes without one."""
        while not self._buf and not self._eof:
            await self._fill()
        return None if not self._buf else await self.reply()

    async def exchange(self, data: bytes, method: str = "GET") -> Reply:
        await self.send(data)
        return await self.reply(method)

    async def closed(self) -> None:
        """The gateway closes the connection, sending nothing more."""
        stray = await self._rest()
        assert stray == b"", f"bytes after the reply: {stray[:300]!r}"

    def leave(self, how: Leave) -> None:
        """Go away: send a FIN (the socket stays open for reading) or a reset."""
        if how == "rst":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        else:
            self.sock.shutdown(socket.SHUT_WR)

    async def after_leaving(self, how: Leave) -> bytes:
        """What the gateway sends once the client has gone, until it closes
        (nothing can be read after a reset)."""
        return b"" if how == "rst" else await self._rest()


@contextlib.asynccontextmanager
async def connect(servers: Servers) -> AsyncIterator[Raw]:
    conn = await Raw.open(servers.gateway.url)
    try:
        yield conn
    finally:
        conn.close()


async def until(condition: Callable[[], object], what: str) -> None:
    """``wait_for`` (polls with a deadline) in a thread, so the loop goes on."""
    await asyncio.to_thread(wait_for, condition, CANCEL_DEADLINE_S, what=what)


def assert_healthz(reply: Reply) -> None:
    assert reply.status == 200, reply
    assert reply.json() == {"status": "ok"}


def assert_completion(reply: Reply, model: str = FAST, tokens: int = 3) -> dict[str, Any]:
    assert reply.status == 200, reply
    doc: dict[str, Any] = reply.json()
    assert doc["object"] == "chat.completion"
    assert doc["model"] == model
    assert doc["usage"]["completion_tokens"] == tokens
    return doc


def assert_openai_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply
    assert (reply.header("content-type") or "").startswith("application/json"), reply
    doc = reply.json()
    assert set(doc) == {"error"}, doc
    error: dict[str, Any] = doc["error"]
    assert {"message", "type", "code"} <= set(error), doc
    assert "Traceback" not in error["message"]
    return error


async def assert_still_serves(servers: Servers) -> None:
    """A fresh connection gets a probe and a completion answered."""
    async with connect(servers) as conn:
        assert_healthz(await conn.exchange(req("GET")))
        assert_completion(await conn.exchange(chat()))


# --- persistence: keep-alive, pipelining, close ------------------------------


async def test_keep_alive_answers_each_request_in_turn(servers: Servers) -> None:
    async with connect(servers) as conn:
        assert_healthz(await conn.exchange(req("GET")))
        assert_completion(await conn.exchange(chat(max_tokens=2)), tokens=2)
        assert_healthz(await conn.exchange(req("GET", "/healthz?x=1")))
        assert_completion(await conn.exchange(chat(max_tokens=4)), tokens=4)


async def test_pipelined_requests_are_answered_complete_and_in_order(servers: Servers) -> None:
    """Three requests in one write, the first the slowest to answer (~150 ms
    of generation): the replies still come in request order."""
    async with connect(servers) as conn:
        await conn.send(chat(SLOW, max_tokens=3) + req("GET") + chat(FAST, max_tokens=2))
        assert_completion(await conn.reply(), SLOW, tokens=3)
        assert_healthz(await conn.reply())
        assert_completion(await conn.reply(), FAST, tokens=2)
        # And the connection is still good for more.
        assert_healthz(await conn.exchange(req("GET")))


async def test_a_deep_pipeline_is_answered_in_full(servers: Servers) -> None:
    """More requests in one write than a server parses ahead of the one it
    handles (it stops reading, then reads on): every one is answered, in order."""
    n = 40
    async with connect(servers) as conn:
        await conn.send(req("GET") * n)
        for _ in range(n):
            assert_healthz(await conn.reply())
        assert_completion(await conn.exchange(chat(FAST, max_tokens=2)), FAST, tokens=2)


async def test_an_absolute_form_target_is_served_as_its_path(
    servers: Servers, request: pytest.FixtureRequest
) -> None:
    """A client configured to use the gateway as its HTTP proxy sends
    ``POST http://host/v1/...`` (RFC 9112 §3.2.2): routed, probed and
    forwarded by its path, as the origin-form would be."""
    known_deviation(request, servers, "absolute-form")
    body = chat_body(FAST, max_tokens=2)
    target = "http://gateway.example/v1/chat/completions"
    async with connect(servers) as conn:
        assert_completion(await conn.exchange(req("POST", target, body=body)), FAST, tokens=2)
        assert_healthz(await conn.exchange(req("GET", "http://gateway.example/healthz?x=1")))


async def test_connection_close_is_answered_then_closed(servers: Servers) -> None:
    async with connect(servers) as conn:
        reply = await conn.exchange(req("GET", headers=[("Connection", "close")]))
        assert_healthz(reply)
        assert "close" in reply.tokens("connection")
        await conn.closed()


async def test_nothing_is_answered_after_a_connection_close_request(
    servers: Servers, request: pytest.FixtureRequest
) -> None:
    """The request that says ``Connection: close`` is answered; one pipelined
    behind it is not served (RFC 9112 §9.6)."""
    known_deviation(request, servers, "close-then-more")
    before = servers.fast.stats()["requests"]
    async with connect(servers) as conn:
        await conn.send(req("GET", headers=[("Connection", "close")]) + chat())
        assert_healthz(await conn.reply())
        await conn.closed()
    await assert_still_serves(servers)
    assert servers.fast.stats()["requests"] == before + 1  # assert_still_serves' own


async def test_http10_without_keep_alive_is_answered_then_closed(servers: Servers) -> None:
    async with connect(servers) as conn:
        reply = await conn.exchange(req("GET", version="1.0"))
        assert_healthz(reply)
        assert not reply.chunked
        await conn.closed()


async def test_http10_keep_alive_is_honoured(servers: Servers) -> None:
    """Recorded behaviour: an HTTP/1.0 client asking ``Connection: keep-alive``
    gets it (the reply says ``Connection: keep-alive`` and a second request
    on the connection is answered). The reply carries a Content-Length, so
    the client can tell where it ends."""
    keep = [("Connection", "keep-alive")]
    async with connect(servers) as conn:
        first = await conn.exchange(req("GET", version="1.0", headers=keep))
        assert_healthz(first)
        assert "keep-alive" in first.tokens("connection")
        assert first.header("content-length") is not None
        assert_completion(await conn.exchange(chat(version="1.0", headers=keep)))
        # Without the header the next one ends the connection.
        assert_healthz(await conn.exchange(req("GET", version="1.0")))
        await conn.closed()


async def test_http10_stream_is_delimited_by_close_not_chunked(servers: Servers) -> None:
    """An HTTP/1.0 client cannot read chunked framing: the stream ends with the connection."""
    async with connect(servers) as conn:
        reply = await conn.exchange(chat(stream=True, version="1.0"))
        assert reply.status == 200, reply
        assert not reply.chunked
        assert reply.header("content-length") is None
        assert reply.body.endswith(b"data: [DONE]\n\n")
        await conn.closed()


# --- request bodies ----------------------------------------------------------


async def test_content_length_body_split_across_many_writes(servers: Servers) -> None:
    """The head is cut inside a header name, between CR and LF, and inside
    the blank line; the body into several pieces. The replica gets the same
    body: the completion is the one a single write gets."""
    body = chat_body(max_tokens=5)
    whole = req("POST", "/v1/chat/completions", body=body)
    async with connect(servers) as conn:
        reference = assert_completion(await conn.exchange(whole), tokens=5)
        head_end = whole.index(b"\r\n\r\n")
        cuts = sorted(
            {
                whole.index(b"Content-Le") + 7,  # inside a header name
                whole.index(b"\r\n", whole.index(b"Host")) + 1,  # between CR and LF
                head_end + 2,  # inside the blank line
                head_end + 4 + 1,  # one byte of the body
                head_end + 4 + len(body) // 3,
                head_end + 4 + 2 * len(body) // 3,
            }
        )
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
        assert b"".join(pieces) == whole
        await conn.send(*pieces)
        split = assert_completion(await conn.reply(), tokens=5)
        assert split["choices"] == reference["choices"]
        assert_healthz(await conn.exchange(req("GET")))


def chunked(*parts: bytes, ext: str = "") -> bytes:
    out = b"".join(b"%X%s\r\n%s\r\n" % (len(p), ext.encode(), p) for p in parts)
    return out + b"0\r\n\r\n"


async def test_chunked_request_body_is_forwarded(servers: Servers) -> None:
    """A body in several chunks (sizes in hex, one with an extension), sent
    in several writes: accepted, forwarded whole, answered as usual."""
    body = chat_body(max_tokens=4)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    parts = [body[:1], body[1:20], body[20:45], body[45:]]
    async with connect(servers) as conn:
        reference = assert_completion(
            await conn.exchange(req("POST", "/v1/chat/completions", body=body)), tokens=4
        )
        encoded = chunked(*parts[:2]).removesuffix(b"0\r\n\r\n")
        encoded += chunked(*parts[2:], ext=";name=value")
        cut = len(encoded) // 2
        await conn.send(head, encoded[:cut], encoded[cut:])
        got = assert_completion(await conn.reply(), tokens=4)
        assert got["choices"] == reference["choices"]
        assert_healthz(await conn.exchange(req("GET")))


# --- streamed replies ----------------------------------------------------------


def sse_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-100:]
    return [e for e in body.split(b"\n\n") if e]


async def test_stream_is_chunked_ends_with_done_and_keeps_the_connection(
    servers: Servers,
) -> None:
    async with connect(servers) as conn:
        await conn.send(chat(stream=True, max_tokens=4))
        head = await conn.head()
        assert head.status == 200, head
        assert (head.header("content-type") or "").startswith("text/event-stream")
        assert head.chunked
        assert head.header("content-length") is None
        parts = []
        while part := await conn.chunk():
            parts.append(part)
        events = sse_events(b"".join(parts))
        assert events[-1] == b"data: [DONE]"
        docs = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
        assert all(d["object"] == "chat.completion.chunk" for d in docs)
        assert sum(bool(d["choices"][0]["delta"].get("content")) for d in docs) == 4
        # The terminating chunk really ended the reply: the next one is clean.
        assert_healthz(await conn.exchange(req("GET")))
        assert_completion(await conn.exchange(chat()))


# --- methods -----------------------------------------------------------------


async def test_head_has_no_body_and_keeps_the_connection(servers: Servers) -> None:
    """HEAD is an allowed method: on the probe it is a 200, on the chat path
    (no body, so no model, so no route) the JSON 404 it would get as GET,
    and in both cases without the body bytes."""
    async with connect(servers) as conn:
        probe = await conn.exchange(req("HEAD"), "HEAD")
        assert probe.status == 200, probe
        chat_head = await conn.exchange(req("HEAD", "/v1/chat/completions"), "HEAD")
        assert chat_head.status == 404, chat_head
        assert (chat_head.header("content-type") or "").startswith("application/json")
        # Had a body followed either head, this would read it as a status line.
        assert_healthz(await conn.exchange(req("GET")))


async def assert_reusable_or_closed(conn: Raw, reply: Reply) -> None:
    """Either the connection serves the next request, or the reply said
    ``Connection: close`` and the gateway closes it (a client must not be
    left to find out by losing its next request)."""
    if "close" in reply.tokens("connection"):
        await conn.closed()
    else:
        assert_healthz(await conn.exchange(req("GET", "/healthz?x=1")))


@pytest.mark.parametrize(
    ("method", "target", "with_body"),
    [
        ("PATCH", "/v1/chat/completions", True),
        ("DELETE", "/v1/chat/completions", True),
        ("TRACE", "/v1/chat/completions", False),
        # No content (RFC 9110 §9.3.6); never a tunnel through the gateway.
        ("CONNECT", "example.com:443", False),
    ],
)
async def test_unsupported_method_is_openai_405_with_allow(
    servers: Servers, request: pytest.FixtureRequest, method: str, target: str, with_body: bool
) -> None:
    """Refused at the edge, naming the methods that are served."""
    if method == "CONNECT":
        known_deviation(request, servers, "connect")
    if with_body:
        known_deviation(request, servers, "refused-with-body")
    async with connect(servers) as conn:
        await conn.send(req(method, target, body=chat_body() if with_body else None))
        reply = await conn.reply_or_close()
        assert reply is not None, "closed without a reply"
        error = assert_openai_error(reply, 405)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "method_not_allowed"
        assert {m.upper() for m in reply.tokens("allow")} == ALLOW
        await assert_reusable_or_closed(conn, reply)


# --- malformed and oversized requests ------------------------------------------


def _smuggling(head: bytes, body: bytes) -> bytes:
    """A POST whose framing is in dispute; whichever way it is read, its
    body (or part of it) is a valid completion request for the fast replica."""
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n" + head + b"\r\n" + body


_CHAT = chat_body()

#: name -> the bytes, and the statuses that are right for them (``None``: the
#: connection closed without a reply).
MALFORMED: dict[str, tuple[bytes, set[int | None]]] = {
    "tls-client-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, {400}),
    "not-http": (b"HELLO WORLD\r\n\r\n", {400}),
    # RFC 9110 §9.1 prefers 501 for a method the server does not know.
    "unknown-method": (b"FOO /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n\r\n", {400, 501}),
    "bad-version": (b"GET /healthz HTTP/9.9\r\nHost: gateway\r\n\r\n", {400, 505}),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    "header-without-colon": (
        b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nno colon here\r\n\r\n",
        {400},
    ),
    # RFC 9112 §5.1: MUST be rejected with a 400.
    "space-before-colon": (b"GET /healthz HTTP/1.1\r\nHost : gateway\r\n\r\n", {400}),
    "bad-content-length": (_smuggling(b"Content-Length: x\r\n", _CHAT), {400}),
    "two-content-lengths": (
        _smuggling(b"Content-Length: %d\r\nContent-Length: 2\r\n" % len(_CHAT), _CHAT),
        {400},
    ),
    "content-length-and-chunked": (
        _smuggling(
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n",
            b"%X\r\n%s\r\n0\r\n\r\n" % (len(_CHAT), _CHAT),
        ),
        {400},
    ),
    # The head was good: the request may be under way when the body goes
    # wrong, so closing without a reply will do.
    "bad-chunk-size": (
        _smuggling(
            b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n",
            b"%X\r\n%s\r\nzz\r\n" % (len(_CHAT), _CHAT),
        ),
        {400, None},
    ),
}


@pytest.mark.parametrize("name", MALFORMED)
async def test_malformed_request_is_400_then_closed(servers: Servers, name: str) -> None:
    """Never a 5xx, never a traceback, never forwarded (a smuggled request
    hides in a disagreement over framing), and the connection is closed:
    after a framing error nothing that follows on it can be trusted."""
    data, statuses = MALFORMED[name]
    before = servers.fast.stats()["requests"]
    async with connect(servers) as conn:
        await conn.send(data)
        reply = await conn.reply_or_close()
        assert (None if reply is None else reply.status) in statuses, reply
        assert reply is None or b"Traceback" not in reply.body
        await conn.closed()
    await assert_still_serves(servers)
    assert servers.fast.stats()["requests"] == before + 1  # assert_still_serves' own


#: name -> a request head too large to be served.
OVERSIZED = {
    "100k-header-value": req("GET", headers=[("X-Big", "a" * 100_000)]),
    "100k-target": req("GET", "/healthz?" + "a" * 100_000),
    # Each field is small and there are not many: the whole head is too large.
    "1mb-of-fields": req("GET", headers=[(f"X-H{i}", "a" * 10_000) for i in range(100)]),
}


@pytest.mark.parametrize("name", OVERSIZED)
async def test_oversized_head_is_refused_then_closed(
    servers: Servers, request: pytest.FixtureRequest, name: str
) -> None:
    """A 431 (or a 414 for the target, or a 400): not a hang, not a 5xx, not
    served."""
    known_deviation(request, servers, name)
    async with connect(servers) as conn:
        reply = await conn.exchange(OVERSIZED[name])
        assert reply.status in (400, 414, 431), reply
        assert b"Traceback" not in reply.body
        await conn.closed()
    await assert_still_serves(servers)


async def test_malformed_requests_leave_no_traceback_in_the_log(
    servers: Servers, request: pytest.FixtureRequest
) -> None:
    """Any client can send these: a line each at most, no traceback (which
    is for the gateway's own bugs). The log is the process's stderr."""
    known_deviation(request, servers, "traceback-in-log")
    log = servers.gateway.log_path
    start = log.stat().st_size
    for data in (
        MALFORMED["two-content-lengths"][0],
        MALFORMED["header-without-colon"][0],
        OVERSIZED["100k-header-value"],
    ):
        async with connect(servers) as conn:
            reply = await conn.exchange(data)
            assert reply.status in (400, 431), reply
    await assert_still_serves(servers)
    written = _read_from(log, start)
    assert "Traceback" not in written, written[-2000:]


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# --- clients that leave early ----------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("stage", ["mid-head", "mid-body"])
async def test_client_leaving_before_its_request_is_whole_reaches_no_replica(
    servers: Servers, stage: str, how: Leave
) -> None:
    whole = chat(SLOW, max_tokens=2)
    head_end = whole.index(b"\r\n\r\n") + 4
    cut = head_end // 2 if stage == "mid-head" else head_end + (len(whole) - head_end) // 2
    before = servers.slow.stats()["requests"]
    async with connect(servers) as conn:
        await conn.send(whole[:cut])
        conn.leave(how)
        after_leaving = await conn.after_leaving(how)
    # Nothing, or a 4xx for the cut request: never a 5xx.
    if after_leaving:
        assert after_leaving.startswith(b"HTTP/1."), after_leaving[:200]
        assert after_leaving[9:10] == b"4", after_leaving[:200]
    await assert_still_serves(servers)
    assert servers.slow.stats()["requests"] == before, "a cut request was forwarded"


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_leaving_before_the_first_byte_cancels_the_generation(
    servers: Servers, how: Leave
) -> None:
    hung = servers.hung
    base = hung.stats()
    async with connect(servers) as conn:
        await conn.send(chat(HUNG, stream=True))
        await until(lambda: hung.stats()["hanging"] == base["hanging"] + 1, "request at replica")
        conn.leave(how)
        # Nothing was committed, so there is nothing to send; and the gateway
        # closes (a FIN, with the request in full, means the client has gone).
        assert await conn.after_leaving(how) == b""
        await until(
            lambda: hung.stats()["cancelled"] == base["cancelled"] + 1,
            "replica saw the cancellation",
        )
    assert hung.stats()["hanging"] == base["hanging"]
    await assert_still_serves(servers)


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_leaving_mid_stream_cancels_the_generation(
    servers: Servers, how: Leave
) -> None:
    slow = servers.slow
    base = slow.stats()
    async with connect(servers) as conn:
        await conn.send(chat(SLOW, stream=True, max_tokens=1000))  # 50 s of tokens
        head = await conn.head()
        assert head.status == 200, head
        received = b""
        while received.count(b"data: ") < 3:
            received += await conn.chunk()
        assert slow.stats()["running"] == base["running"] + 1
        conn.leave(how)
        await until(
            lambda: slow.stats()["cancelled"] == base["cancelled"] + 1,
            "replica saw the cancellation",
        )
    await until(lambda: slow.stats()["running"] == base["running"], "replica slot freed")
    assert slow.stats()["completed"] == base["completed"]
    await assert_still_serves(servers)
