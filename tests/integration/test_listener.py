"""The main listener in this process (so a bug can be planted in it): its
handler is the hot path's isolation boundary, and its runner carries the
gateway's life."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llmproxy import listener
from llmproxy.app import make_runner
from llmproxy.config import parse_config
from llmproxy.config.loader import HTTP_SERVERS
from llmproxy.gateway import Gateway
from tests.support import Sim


def _config(backend: str, **extra: Any) -> dict[str, Any]:
    return {
        "pools": {"main": {"backends": [{"url": backend}], "health": {"enabled": False}}},
        "routes": [{"name": "all", "match": {"model": "*"}, "pool": "main"}],
        "admin": {"enabled": False},
        **extra,
    }


@pytest.fixture(params=HTTP_SERVERS)
def engine(request: pytest.FixtureRequest) -> str:
    """Each test runs on each of the main listener's HTTP servers (``server.http``)."""
    return str(request.param)


@pytest.fixture
async def running(engine: str) -> AsyncIterator[tuple[Gateway, str]]:
    # Nothing listens on port 9: these tests never reach a replica.
    async for pair in _serve(_config("http://127.0.0.1:9", server={"http": engine})):
        yield pair


async def _serve(config: dict[str, Any]) -> AsyncIterator[tuple[Gateway, str]]:
    gw = Gateway(parse_config(config, {}))
    runner = make_runner(gw)
    await runner.setup()
    try:
        await runner.listen("127.0.0.1", 0)
        host, port = runner.addresses[0][:2]
        yield gw, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_a_bug_on_the_hot_path_is_a_clean_500(
    running: tuple[Gateway, str], caplog: pytest.LogCaptureFixture
) -> None:
    gw, url = running
    assert gw.forwarder is not None

    async def broken(request: web.BaseRequest) -> web.StreamResponse:
        raise KeyError("planted")

    gw.forwarder.handle = broken  # type: ignore[method-assign]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json={"model": "m"}) as resp,
    ):
        body = await resp.read()
        assert resp.status == 500
        assert resp.content_type == "application/json"
        error = json.loads(body)["error"]
        assert error["message"] == "internal error in the gateway"
        assert "Traceback" not in body.decode()
        # The listener goes on: probes and the next request are answered.
        async with session.get(f"{url}/healthz") as probe:
            assert probe.status == 200
        async with session.post(f"{url}/v1/chat/completions", json={"model": "m"}) as again:
            assert again.status == 500
    assert "unhandled error on POST /v1/chat/completions" in caplog.text


async def test_probes_answer_without_a_replica(running: tuple[Gateway, str]) -> None:
    _, url = running
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with session.head(f"{url}/healthz") as resp:
            assert resp.status == 200
        # Not a probe: the proxy answers (no model, no route match -> OpenAI 4xx/5xx).
        async with session.get(f"{url}/healthzzz") as resp:
            assert resp.status >= 400
            assert "error" in await resp.json()


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    # One token at once, the next a minute later: a stream that stays open.
    sim = Sim(
        tmp_path_factory.mktemp("listener"),
        *("--model", "sim-model", "--ttft-ms", "0", "--tokens-per-s", "0.02"),
    )
    yield sim
    sim.stop()


@pytest.mark.parametrize("log_prompts", [False, True], ids=["default", "log_prompts"])
async def test_an_open_stream_does_not_hold_its_prompt(
    slow_sim: Sim, tmp_path: Path, log_prompts: bool, engine: str
) -> None:
    """Once the response is committed no retry can follow: the request body
    (a long prompt, say) is let go, unless the access log logs prompts."""
    access_log = {"enabled": True, "path": str(tmp_path / "a.log"), "log_prompts": log_prompts}
    messages = [{"role": "user", "content": "x" * (8 << 20)}]
    body = json.dumps({"model": "sim-model", "stream": True, "messages": messages}).encode()
    del messages  # the test holds the body alone, from before the baseline to the end
    server = {"max_body_bytes": 16 << 20, "http": engine}
    config = _config(slow_sim.url, server=server, access_log=access_log)
    tracemalloc.start()
    try:
        async for gw, url in _serve(config):
            async with aiohttp.ClientSession() as session:
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                async with session.post(
                    f"{url}/v1/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 200
                    first = await asyncio.wait_for(resp.content.readline(), 10)
                    assert first.startswith(b"data: ")
                    # Poll: the commit point is passed once the first event is here.
                    deadline = time.monotonic() + 5
                    while True:
                        gc.collect()
                        held = tracemalloc.get_traced_memory()[0] - before
                        if log_prompts or held < (2 << 20) or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.01)
                    assert gw.forwarder is not None
                    (ex,) = gw.forwarder._active
                    if log_prompts:
                        assert ex.body is not None
                        assert held > (8 << 20)
                    else:
                        assert ex.body is None
                        assert held < (2 << 20), f"{held:,} bytes still held by an open stream"
    finally:
        tracemalloc.stop()


async def test_an_open_stream_holds_no_keepalive_timer(slow_sim: Sim) -> None:
    """A stream may stay open for minutes: once it begins, its connection
    no longer holds the keep-alive timer (it is armed again when the
    request ends)."""
    async for gw, url in _serve(_config(slow_sim.url, server={"http": "httptools"})):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        messages = [{"role": "user", "content": "hi"}]
        body = json.dumps({"model": "sim-model", "stream": True, "messages": messages}).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert gw.forwarder is not None
        (ex,) = gw.forwarder._active
        connection = ex.request._proto  # type: ignore[attr-defined]
        assert connection._idle is None
        writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(engine: str) -> None:
    """``server.keepalive_timeout_s``: an idle connection between requests,
    and one that never completes a request head, are closed."""
    server = {"http": engine, "keepalive_timeout_s": 0.2}
    async for _, url in _serve(_config("http://127.0.0.1:9", server=server)):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # Nothing more: the gateway closes the connection (EOF within the deadline).
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # and no more
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_the_keepalive_timeout_counts_from_the_last_answer(engine: str) -> None:
    """A connection that keeps sending requests, for longer than the
    keep-alive timeout in all, is never closed under them; once it goes
    quiet it is closed the timeout after its last answer, not earlier."""
    timeout = 0.4
    server = {"http": engine, "keepalive_timeout_s": timeout}
    async for _, url in _serve(_config("http://127.0.0.1:9", server=server)):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            answered = loop.time()
            if answered - started > 2.5 * timeout:
                break
            await asyncio.sleep(timeout / 3)  # the client's pace, not a wait for the gateway
        assert await asyncio.wait_for(reader.read(), 5) == b""
        quiet = loop.time() - answered
        assert timeout - 0.01 <= quiet < timeout + 1.0, quiet
        writer.close()


async def test_a_refused_body_still_being_sent_does_not_lose_the_reply(engine: str) -> None:
    """A 413 for a body over the limit goes out at once, while the client is
    still sending it: the connection is closed without losing the reply
    (closing with bytes unread would reset it under the reply)."""
    server = {"http": engine, "max_body_bytes": 1024}
    async for _, url in _serve(_config("http://127.0.0.1:9", server=server)):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        size = 4 << 20
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
        )
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < size:  # the body keeps coming after the reply
                writer.write(b"x" * 65536)
                sent += 65536
                await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413"), head
        writer.close()


async def test_a_body_that_stops_coming_gets_a_408(
    engine: str, request: pytest.FixtureRequest
) -> None:
    """A client that sends a head and part of its body, then nothing more,
    does not hold its connection (and a task) for ever: after
    ``server.keepalive_timeout_s`` without a byte it gets a 408."""
    if engine == "aiohttp":
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="aiohttp's server waits for a body for ever")
        )
    server = {"http": engine, "keepalive_timeout_s": 0.3}
    async for _, url in _serve(_config("http://127.0.0.1:9", server=server)):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model": '
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        error = json.loads(await reader.readexactly(length))["error"]
        assert error["code"] == "request_timeout"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed
        writer.close()


async def test_a_slow_but_steady_body_is_not_cut(engine: str) -> None:
    """The 408 is for a client gone quiet, not a slow one: a body sent over
    twice the timeout, in pieces closer together than it, is taken whole."""
    server = {"http": engine, "keepalive_timeout_s": 0.4}
    async for _, url in _serve(_config("http://127.0.0.1:9", server=server)):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": "m", "messages": []}).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), len(body) // 8 + 1):
            writer.write(body[i : i + len(body) // 8 + 1])
            await asyncio.sleep(0.1)  # the client's pace, not a wait for the gateway
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        # Read whole and routed: no replica listens on port 9, so a 5xx, not a 408.
        assert head.startswith(b"HTTP/1.1 5"), head
        writer.close()


# --- a whole body answered in one write ----------------------------------------

#: Upstream answers (head fields, body), each relayed whole (it comes in one read).
_CANNED: dict[str, tuple[list[tuple[str, str]], bytes]] = {
    "full": (
        [
            ("Date", "Sun, 06 Dec 2026 09:00:00 GMT"),
            ("Server", "replica/1"),
            ("Content-Type", "application/json"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Note", "café"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "dropped: named by Connection"),
            ("X-Request-Id", "the replica's own"),
        ],
        b'{"ok": true}',
    ),
    "bare": ([], b"plain bytes"),
    "error": ([("Content-Type", "application/json")], b'{"error": {"message": "no"}}'),
}


async def _canned_upstream() -> tuple[asyncio.Server, str]:
    """Answers ``POST /<case>`` with that case's canned reply (keep-alive)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                case = head.split(b" ")[1].decode().strip("/")
                fields, body = _CANNED[case]
                status = b"422 Unprocessable Entity" if case == "error" else b"200 OK"
                lines = b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)
                writer.write(
                    b"HTTP/1.1 %b\r\n%bContent-Length: %d\r\n\r\n%b"
                    % (status, lines, len(body), body)
                )
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, f"http://{host}:{port}"


def _head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Status line and fields, lower-case names, sorted; the gateway's own
    Date and request id (they differ between any two replies) as '*'."""
    lines = raw.decode("utf-8").split("\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        name = name.lower()
        if name == "x-request-id" or (name == "date" and "2026 09:00:00" not in value):
            value = "*"
        fields.append((name, value))
    return lines[0], sorted(fields)


async def _exchange(url: str, request: bytes) -> tuple[bytes, bytes, bool]:
    """One raw request: (head, body, whether the gateway then closed)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
        except TimeoutError:
            closed = False
        return head[:-4], body, closed
    finally:
        writer.close()


@pytest.mark.parametrize("case", sorted(_CANNED))
@pytest.mark.parametrize(
    ("version", "connection"),
    [("1.1", ""), ("1.1", "close"), ("1.0", ""), ("1.0", "keep-alive")],
)
async def test_a_whole_body_reply_is_what_aiohttp_writes(
    case: str, version: str, connection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener answers a body that came whole in one write of its own
    (``Request.reply``), not through an aiohttp response: the head, body and
    keep-alive are those aiohttp's server writes for the same answer."""
    answered = []
    reply = listener.Request.reply

    def spy(self: listener.Request, *args: Any) -> web.StreamResponse | None:
        answered.append(reply(self, *args))
        return answered[-1]

    monkeypatch.setattr(listener.Request, "reply", spy)
    upstream, backend = await _canned_upstream()
    body = json.dumps({"model": "m", "messages": []}).encode()
    request = (
        f"POST /{case} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        + (f"Connection: {connection}\r\n" if connection else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    replies = {}
    try:
        for engine in HTTP_SERVERS:
            async for _, url in _serve(_config(backend, server={"http": engine})):
                head, got, closed = await _exchange(url, request)
                replies[engine] = (_head(head), got, closed)
    finally:
        upstream.close()
        await upstream.wait_closed()
    assert answered == [listener.ANSWERED]  # the httptools engine's, in one write
    ours, theirs = replies["httptools"], replies["aiohttp"]
    assert ours == theirs
    (status, fields), got, closed = ours
    assert status == f"HTTP/{version} {'422 Unprocessable Entity' if case == 'error' else '200 OK'}"
    assert got == _CANNED[case][1]
    assert closed == (connection == "close" or (version == "1.0" and connection != "keep-alive"))
    names = [n for n, _ in fields]
    assert "x-hop" not in names
    assert names.count("x-request-id") == 1
    assert {"date", "server", "content-type", "content-length"} <= set(names)
