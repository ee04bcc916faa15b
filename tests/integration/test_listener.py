"""The main listener in this process (so a bug can be planted in it): its
handler is the hot path's isolation boundary, and its runner carries the
gateway's life."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from llmproxy.app import GatewayRunner
from llmproxy.config import parse_config
from llmproxy.gateway import Gateway


@pytest.fixture
async def running() -> AsyncIterator[tuple[Gateway, str]]:
    config = {
        "pools": {
            "main": {
                # Nothing listens there; these tests never reach a replica.
                "backends": [{"url": "http://127.0.0.1:9"}],
                "health": {"enabled": False},
            }
        },
        "routes": [{"name": "all", "match": {"model": "*"}, "pool": "main"}],
        "admin": {"enabled": False},
    }
    gw = Gateway(parse_config(config, {}))
    runner = GatewayRunner(gw)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
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
