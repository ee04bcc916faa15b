"""Two gateway processes enforce one rate-limit budget through one real
redis-server, and keep answering, at once, when Redis hangs or dies:
``on_store_error: allow`` serves, ``deny`` refuses with a 503.

The budget refills one request every 6 s (10 a minute) and each phase takes
well under that, so the counts are exact: the only slack the limiter allows
is refill, ``10 · W / 60`` requests over W seconds, which the assertions
compute from the time measured.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_support import RedisServer, redis_server
from tests.support import Gateway, Sim, http, pool_config, wait_for

MODEL = "sim-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
LIMIT = 10  # requests a minute per API key, shared by both gateways
#: A Redis call slower than this is a store error: the bound on a hung Redis.
REDIS_TIMEOUT_S = 0.25
#: What "answered at once" means here, with Redis hung or gone.
QUICK_S = 1.0


def metric(gw: Gateway, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(gw.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def chat(gw: Gateway, key: str) -> tuple[int, dict[str, str], dict[str, Any], float]:
    """One request with ``key``; (status, headers lower-cased, body, seconds taken)."""
    t0 = time.monotonic()
    status, headers, body = http(
        "POST",
        f"{gw.url}/v1/chat/completions",
        BODY,
        {"Authorization": f"Bearer {key}"},
        timeout=5,
    )
    lowered = {k.lower(): v for k, v in headers.items()}
    return status, lowered, json.loads(body), time.monotonic() - t0


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[RedisServer, Sim, Gateway, Gateway]]:
    """Redis, one replica, and two gateways on the same Redis and key prefix:
    ``allow`` and ``deny`` when the store cannot answer."""
    with redis_server(tmp_path) as redis:
        sim = Sim(tmp_path, "--ttft-ms", "0", "--tokens-per-s", "0")
        gateways: list[Gateway] = []
        try:
            for mode in ("allow", "deny"):
                cfg = pool_config(sim.url, health={"enabled": False})
                cfg["rate_limits"] = {
                    "store": redis.url,
                    "on_store_error": mode,
                    "redis_timeout_s": REDIS_TIMEOUT_S,
                    "key_prefix": "shared-test",
                    "rules": [{"key": "api_key", "requests_per_minute": LIMIT}],
                }
                gateways.append(Gateway(tmp_path, cfg, name=f"gw-{mode}"))
            allow, deny = gateways
            # Connect each to Redis and load its script, on a key of its own,
            # so a cold first call cannot turn into a timeout below.
            for gw in gateways:
                assert chat(gw, f"sk-warmup-{gw.config_path.stem}")[0] == 200
            yield redis, sim, allow, deny
        finally:
            for gw in gateways:
                gw.stop()
            sim.stop()


async def test_two_gateways_admit_the_limit_together(
    setup: tuple[RedisServer, Sim, Gateway, Gateway],
) -> None:
    _, sim, allow, deny = setup
    served_before = sim.stats()["requests"]

    # 40 concurrent requests with one key, 20 through each gateway.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:

        async def one(gw: Gateway) -> tuple[str, int]:
            headers = {"Authorization": "Bearer sk-shared"}
            async with s.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=headers) as r:
                await r.read()
                return gw.config_path.stem, r.status

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(gw) for _ in range(20) for gw in (allow, deny)))
        elapsed = time.monotonic() - t0

    statuses = Counter(status for _, status in results)
    assert set(statuses) <= {200, 429}, statuses
    slack = int(LIMIT * elapsed / 60)  # refill while the burst ran: 0 under 6 s
    assert LIMIT <= statuses[200] <= LIMIT + slack, (statuses, elapsed)
    assert sim.stats()["requests"] - served_before == statuses[200]
    # Both gateways took part, and neither admitted anything on a store error.
    by_gateway = Counter(name for name, status in results if status == 200)
    assert sum(by_gateway.values()) == statuses[200]
    for gw in (allow, deny):
        assert metric(gw, "llmproxy_ratelimit_store_errors_total") == 0
    refused = sum(
        metric(gw, "llmproxy_ratelimited_total", rule="api_key:requests") for gw in (allow, deny)
    )
    assert refused == statuses[429]

    # Taking turns, the gateways report one bucket counting down.
    remaining = []
    for i in range(LIMIT):
        status, headers, _, _ = chat((allow, deny)[i % 2], "sk-turns")
        assert status == 200
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining == list(range(LIMIT - 1, -1, -1))
    for gw in (allow, deny):
        status, headers, body, _ = chat(gw, "sk-turns")
        assert status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert int(headers["retry-after"]) >= 1


def test_hung_or_dead_redis_allow_serves_and_deny_refuses_at_once(
    setup: tuple[RedisServer, Sim, Gateway, Gateway],
) -> None:
    redis, _, allow, deny = setup
    # Use up the shared budget: under allow, an outage lets requests through
    # that Redis would have refused.
    for _ in range(LIMIT):
        assert chat(allow, "sk-spent")[0] == 200
    assert chat(deny, "sk-spent")[0] == 429

    def outage_checks(what: str) -> None:
        for i in range(8):
            status, headers, body, took = chat(allow, "sk-spent")
            assert (status, took < QUICK_S) == (200, True), (what, "allow", i, status, took)
            status, headers, body, took = chat(deny, "sk-spent")
            assert (status, took < QUICK_S) == (503, True), (what, "deny", i, status, took)
            assert body["error"]["code"] == "rate_limit_store_unavailable"
            assert int(headers["retry-after"]) >= 1

    def recovered(key: str) -> bool:
        return chat(deny, key)[0] == 200

    # Hung: Redis keeps its socket and answers nothing.
    redis.pause()
    try:
        outage_checks("paused")
    finally:
        redis.resume()
    wait_for(lambda: recovered("sk-after-pause"), timeout=10, what="deny serves after resume")
    assert chat(deny, "sk-spent")[0] == 429  # the shared budget is still spent

    # Dead: connections refused.
    refused_before = metric(deny, "llmproxy_ratelimited_total", rule="store_unavailable")
    redis.kill()
    outage_checks("killed")
    for gw in (allow, deny):
        assert metric(gw, "llmproxy_ratelimit_store_errors_total") > 0
    refused = metric(deny, "llmproxy_ratelimited_total", rule="store_unavailable")
    assert refused - refused_before == 8
    assert metric(allow, "llmproxy_ratelimited_total", rule="store_unavailable") == 0

    # Back (empty): the limit holds again (counted on deny, where a store
    # error would show as a 503, not as an admission).
    redis.restart()
    wait_for(lambda: recovered("sk-after-restart"), timeout=10, what="deny serves after restart")
    for _ in range(LIMIT - 1):
        assert chat(deny, "sk-after-restart")[0] == 200
    assert chat(deny, "sk-after-restart")[0] == 429
