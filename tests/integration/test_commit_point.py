"""The commit point (ARCHITECTURE §2): failures before the first byte are
invisible to the client; failures after it end the response visibly."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support import Gateway, Sim, http, pool_config, wait_for

MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "hello"}]


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connect is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def sim(tmp: Path) -> Iterator[Sim]:
    s = Sim(tmp, "--model", MODEL, "--ttft-ms", "0", "--tokens-per-s", "0")
    yield s
    s.stop()


def test_dead_backend_is_retried_invisibly(tmp: Path, sim: Sim) -> None:
    cfg = pool_config(closed_port_url(), sim.url, balancer="round_robin")
    cfg["pools"]["main"]["health"] = {"enabled": False}
    gw = Gateway(tmp, cfg)
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        attempts = []
        for _ in range(6):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=2
            )
            assert raw.parse().choices[0].message.content
            attempts.append(raw.headers["x-llmproxy-attempts"])
            assert raw.headers["x-llmproxy-backend"] == sim.url.removeprefix("http://")
        # Round robin puts every other first attempt on the dead backend.
        assert "2" in attempts
        assert "1" in attempts
    finally:
        gw.stop()


def test_all_backends_unreachable_gives_503_with_retry_after(tmp: Path) -> None:
    cfg = pool_config(closed_port_url(), closed_port_url())
    cfg["pools"]["main"]["health"] = {"enabled": False}
    gw = Gateway(tmp, cfg)
    try:
        status, headers, body = http(
            "POST", f"{gw.url}/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}
        )
        # Nothing could be reached at all: 503 and a hint when to come back
        # (as Envoy answers an upstream connect error), not a 502.
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["type"] == "upstream_error"
        # Both backends tried; the third (default) attempt may reuse one, as
        # all eligible backends have been tried.
        assert headers["x-llmproxy-attempts"] == "3"
    finally:
        gw.stop()


def test_first_byte_timeout_moves_on(tmp: Path, sim: Sim) -> None:
    hung = Sim(tmp, "--model", MODEL, "--hang", name="hung")
    cfg = pool_config(hung.url, sim.url, balancer="round_robin")
    cfg["pools"]["main"]["timeouts"] = {"first_byte_s": 0.3}
    gw = Gateway(tmp, cfg)
    try:
        for _ in range(4):
            status, _headers, _ = http(
                "POST",
                f"{gw.url}/v1/chat/completions",
                {"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
            )
            assert status == 200
        assert hung.stats()["requests"] >= 1
        # The hung replica's abandoned requests were closed, not left open.
        wait_for(lambda: hung.stats()["cancelled"] == hung.stats()["requests"])
    finally:
        gw.stop()
        hung.stop()


async def test_stream_cut_mid_way_ends_with_sse_error_event(tmp: Path) -> None:
    cut = Sim(tmp, "--model", MODEL, "--ttft-ms", "0", "--tokens-per-s", "0",
              "--cut-after-tokens", "3", name="cut")  # fmt: skip
    gw = Gateway(tmp, pool_config(cut.url))
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "stream": True}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.url}/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            raw = await r.read()  # ends cleanly: no exception
        events = [e for e in raw.decode().split("\n\n") if e.strip()]
        last = json.loads(events[-1].removeprefix("data: "))
        assert "error" in last
        assert "[DONE]" not in raw.decode()
        assert sum("chat.completion.chunk" in e for e in events) >= 3
        assert 'kind="midstream"' in gw.metrics()
    finally:
        gw.stop()
        cut.stop()


async def test_non_streamed_cut_is_not_a_complete_body(tmp: Path) -> None:
    cut = Sim(tmp, "--model", MODEL, "--ttft-ms", "0", "--tokens-per-s", "0",
              "--cut-after-tokens", "3", name="cut")  # fmt: skip
    gw = Gateway(tmp, pool_config(cut.url))
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10}
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.post(f"{gw.url}/v1/chat/completions", json=body) as r:
                    await r.read()
    finally:
        gw.stop()
        cut.stop()
