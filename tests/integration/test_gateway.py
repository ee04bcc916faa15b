"""The gateway as a user meets it: real processes, real sockets, the openai SDK.

One gateway process in front of simulated replica processes; every assertion
is about what a client or a replica observed on the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support import Gateway, Sim, get_json, http, pool_config, wait_for

MODEL = "sim-model"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def sims(tmp: Path) -> Iterator[list[Sim]]:
    procs = [
        Sim(tmp, "--model", MODEL, "--ttft-ms", "5", "--tokens-per-s", "0", name=f"sim{i}")
        for i in range(2)
    ]
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def gw(tmp: Path, sims: list[Sim]) -> Iterator[Gateway]:
    cfg = pool_config(*(s.url for s in sims), balancer="round_robin")
    cfg["server"] = {"max_body_bytes": 64 * 1024}
    cfg["routes"] = [
        {"name": "chat", "match": {"model": MODEL}, "pool": "main"},
        {"name": "tgi", "match": {"path_prefix": "/generate"}, "pool": "main"},
        {"name": "info", "match": {"path_prefix": "/info"}, "pool": "main"},
    ]
    g = Gateway(tmp, cfg)
    yield g
    assert g.stop() == 0, g.log()


@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-test", max_retries=0)


def direct(sim: Sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", max_retries=0)


MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


def test_chat_completion_same_as_direct(client: openai.OpenAI, sims: list[Sim]) -> None:
    via = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    ref = direct(sims[0]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    assert via.choices[0].message.content == ref.choices[0].message.content
    assert via.choices[0].message.content
    assert via.usage is not None
    assert ref.usage is not None
    assert via.usage.completion_tokens == ref.usage.completion_tokens == 7


def test_streamed_chat_same_as_direct(client: openai.OpenAI, sims: list[Sim]) -> None:
    def collect(c: openai.OpenAI) -> tuple[str, int | None]:
        text, usage = [], None
        for ev in c.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if ev.choices:
                text.append(ev.choices[0].delta.content or "")
            if ev.usage:
                usage = ev.usage.completion_tokens
        return "".join(text), usage

    via, ref = collect(client), collect(direct(sims[1]))
    assert via == ref
    assert via[1] == 9


@pytest.mark.parametrize("stream", [False, True])
def test_completions_same_as_direct(client: openai.OpenAI, sims: list[Sim], stream: bool) -> None:
    def run(c: openai.OpenAI) -> str:
        if stream:
            return "".join(
                ev.choices[0].text
                for ev in c.completions.create(
                    model=MODEL, prompt="hello there", max_tokens=5, stream=True
                )
                if ev.choices
            )
        return c.completions.create(model=MODEL, prompt="hello there", max_tokens=5).choices[0].text

    assert run(client) == run(direct(sims[0]))


def test_tgi_generate_stream_passes_through_intact(gw: Gateway, sims: list[Sim]) -> None:
    body = {"inputs": "tell me", "parameters": {"max_new_tokens": 6}}
    st_via, h_via, via = http("POST", f"{gw.url}/generate_stream", body)
    st_ref, _, ref = http("POST", f"{sims[0].url}/generate_stream", body)
    assert st_via == st_ref == 200
    assert h_via["Content-Type"].startswith("text/event-stream")
    assert via == ref
    assert via.count(b"data:") == 6
    st, _, info = http("GET", f"{gw.url}/info")
    assert st == 200
    assert json.loads(info)


async def test_proxy_headers(gw: Gateway, sims: list[Sim]) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    headers = {
        "X-Request-Id": "req-123",
        "X-Forwarded-For": "203.0.113.9",
        "Connection": "keep-alive, X-Private",
        "X-Private": "hop",
        "Authorization": "Bearer sk-test",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200
        await r.read()
        got = r.headers
    assert got["x-request-id"] == "req-123"
    assert got["x-llmproxy-pool"] == "main"
    assert got["x-llmproxy-attempts"] == "1"
    backend = got["x-llmproxy-backend"]
    served = next(s for s in sims if s.url.endswith(backend))
    seen = {k.lower(): v for k, v in served.stats()["last_headers"].items()}
    assert seen["x-request-id"] == "req-123"
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert "x-private" not in seen  # named in Connection: hop-by-hop
    assert seen.get("connection", "keep-alive").lower() == "keep-alive"
    # A request id is made when the client sends none.
    _, made, _ = http("GET", f"{gw.url}/v1/models", headers={})
    assert len(made["x-request-id"]) == 32


async def test_first_event_arrives_while_replica_holds_the_next(tmp: Path) -> None:
    """No buffering: the first SSE event reaches the client while the replica
    has not yet sent the second (it is still generating, one token per 2 s)."""
    sim = Sim(tmp, "--model", MODEL, "--ttft-ms", "0", "--tokens-per-s", "0.5", name="slow")
    gw = Gateway(tmp, pool_config(sim.url), name="gw-nobuf")
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.url}/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            line = await asyncio.wait_for(r.content.readline(), timeout=1.5)
            assert line.startswith(b"data: {")
            stats = sim.stats()
            assert stats["running"] == 1
            assert stats["completed"] == 0
    finally:
        gw.stop()
        sim.stop()


async def test_client_disconnect_cancels_upstream(tmp: Path) -> None:
    sim = Sim(tmp, "--model", MODEL, "--ttft-ms", "0", "--tokens-per-s", "5", name="cancel")
    gw = Gateway(tmp, pool_config(sim.url), name="gw-cancel")
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "stream": True}
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"{gw.url}/v1/chat/completions", json=body)
            assert r.status == 200
            await r.content.readline()
            wait_for(lambda: gw.in_flight() == 1, what="in-flight 1")
            r.close()  # the client leaves mid-stream
        wait_for(lambda: sim.stats()["cancelled"] == 1, what="replica saw the cancellation")
        wait_for(lambda: gw.in_flight() == 0, what="in-flight back to 0")
        assert "llmproxy_upstream_cancelled_total" in gw.metrics()
        # Non-streamed: the client gives up while the replica is still generating.
        body["stream"] = False
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(s.post(f"{gw.url}/v1/chat/completions", json=body), 0.5)
        wait_for(lambda: sim.stats()["cancelled"] == 2, what="non-streamed cancellation")
        wait_for(lambda: gw.in_flight() == 0, what="in-flight back to 0")
    finally:
        gw.stop()
        sim.stop()


def _error(status: int, body: bytes) -> dict[str, object]:
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    assert {"message", "type", "code"} <= set(doc["error"]), doc
    return doc["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400),
        ("POST", "/v1/chat/completions", b'{"model": "nope", "messages": []}', 404),
        ("POST", "/v1/chat/completions", b'["model"]', 400),
        ("POST", "/v1/chat/completions", b'{"model": 7}', 400),
        ("PUT", "/v1/chat/completions", b"{}", 405),
        ("DELETE", "/v1/models", b"", 405),
        ("GET", "/nothing/here", b"", 404),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(
    gw: Gateway, method: str, path: str, raw: bytes, status: int
) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{gw.url}{path}", data=raw or None, method=method,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            got, body = r.status, r.read()
    except urllib.error.HTTPError as exc:
        got, body = exc.code, exc.read()
    assert got == status, body
    err = _error(got, body)
    assert err["type"] == "invalid_request_error"
    assert "Traceback" not in err["message"]  # type: ignore[operator]


def test_body_over_limit_is_413(gw: Gateway) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
    status, _, body = http("POST", f"{gw.url}/v1/chat/completions", big)
    assert status == 413
    assert _error(status, body)["code"] == "request_too_large"


async def test_chunked_body_over_limit_is_413(gw: Gateway) -> None:
    """No Content-Length to check up front: the limit holds while reading."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "sim-model", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 4096

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/chat/completions", data=chunks()) as resp,
    ):
        body = await resp.read()
    assert resp.status == 413
    assert _error(resp.status, body)["code"] == "request_too_large"


async def _raw_exchange(gw: Gateway, head: bytes, body: bytes, *, await_continue: bool) -> bytes:
    """Send a request head, optionally wait for 100 Continue, then the body;
    return everything the gateway sent until it closed the connection."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        if await_continue:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_expect_100_continue_is_answered(gw: Gateway) -> None:
    """curl sends ``Expect: 100-continue`` before a large body and waits for
    the interim answer: the gateway gives it, then relays the request."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 3}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    answer = await _raw_exchange(gw, head, body, await_continue=True)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    doc = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert doc["usage"]["completion_tokens"] == 3


async def test_unknown_expectation_is_417(gw: Gateway) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n"
    )
    answer = await _raw_exchange(gw, head, b"{}", await_continue=False)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 417")
    err = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "expectation_failed"


def test_sdk_sees_not_found_for_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-unknown", messages=MESSAGES)
    assert "gpt-unknown" in str(exc.value)


def test_probes(gw: Gateway) -> None:
    assert get_json(f"{gw.url}/healthz")["status"] == "ok"
    assert get_json(f"{gw.url}/healthz?from=k8s")["status"] == "ok"
    assert get_json(f"{gw.url}/readyz")["status"] == "ready"
    assert get_json(f"{gw.admin_url}/readyz")["ready"] is True
    text = gw.metrics()
    assert "llmproxy_requests_total{backend=" in text
    assert "llmproxy_time_to_first_byte_seconds_bucket" in text
    assert "llmproxy_request_duration_seconds_bucket" in text
    assert "llmproxy_backend_in_flight{" in text


def test_ip_keys_use_forwarded_for_only_when_trusted(tmp: Path, sims: list[Sim]) -> None:
    """An ``ip`` rate limit of 1 a minute: behind a trusted load balancer each
    X-Forwarded-For client has its own bucket; otherwise the header is ignored
    (any client could name any address) and the peer's bucket is shared."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    for trusted in (True, False):
        cfg = pool_config(sims[0].url)
        cfg["server"] = {"trust_forwarded_for": trusted}
        cfg["rate_limits"] = {"rules": [{"key": "ip", "requests_per_minute": 1}]}
        gw = Gateway(tmp, cfg, name=f"gw-xff-{trusted}")
        try:
            url = f"{gw.url}/v1/chat/completions"
            first = http("POST", url, body, headers={"X-Forwarded-For": "203.0.113.1"})[0]
            other = http("POST", url, body, headers={"X-Forwarded-For": "203.0.113.2"})[0]
            again = http("POST", url, body, headers={"X-Forwarded-For": "203.0.113.1"})[0]
        finally:
            gw.stop()
        assert first == 200
        assert other == (200 if trusted else 429)
        assert again == 429
