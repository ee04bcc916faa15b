"""Rate limits on a real redis-server: the store contract (shared with the
memory store), several gateways sharing one budget, and Redis going away.

Redis keeps its own time, so these tests use real time with rates slow
enough (a refill every several seconds) that the counts are still exact.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llmproxy.config.schema import RateLimitRule, RateLimitsConfig
from llmproxy.policy.ratelimit import Admission, LimitRequest, RateLimiter
from llmproxy.policy.ratelimit_redis import RedisStore
from llmproxy.policy.ratelimit_store import MemoryStore
from tests.redis_support import RedisServer, redis_server

MakeLimiter = Callable[..., RateLimiter]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeLimiter]:
    """Contract tests run against both stores."""
    server = RedisServer(tmp_path) if request.param == "redis" else None
    made: list[RateLimiter] = []

    def make(*rules: RateLimitRule) -> RateLimiter:
        # deny: a store error shows up as a refusal the assertions catch.
        config = RateLimitsConfig(on_store_error="deny", rules=rules)
        if server is None:
            made.append(RateLimiter(config, MemoryStore(time.monotonic)))
        else:
            made.append(RateLimiter(config, RedisStore(server.url, timeout_s=5.0)))
        return made[-1]

    yield make
    for lim in made:
        await lim.close()
    if server is not None:
        server.stop()


@pytest.fixture
async def gateways(redis: RedisServer) -> AsyncIterator[Callable[..., RateLimiter]]:
    """Limiters that each own a RedisStore on the same server, as separate
    gateways would. ``deny`` and a 5 s timeout unless a test says otherwise,
    so that a loaded machine cannot turn a slow answer into an extra admission."""
    made: list[RateLimiter] = []

    def make(
        *rules: RateLimitRule,
        on_store_error: str = "deny",
        on_error: Callable[[], None] | None = None,
        **store: Any,
    ) -> RateLimiter:
        config = RateLimitsConfig(on_store_error=on_store_error, rules=rules)
        store.setdefault("timeout_s", 5.0)
        made.append(RateLimiter(config, RedisStore(redis.url, **store), on_store_error=on_error))
        return made[-1]

    yield make
    for lim in made:
        await lim.close()


async def admit_all(lim: RateLimiter, n: int, req: LimitRequest) -> list[Admission]:
    return [await lim.admit(req) for _ in range(n)]


# --- the store contract, on both stores -------------------------------------


async def test_contract_requests(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(RateLimitRule(key="api_key", requests_per_minute=6))
    req = LimitRequest(api_key_hash="k")
    assert all(a.allowed for a in await admit_all(lim, 6, req))
    refused = await lim.admit(req)
    assert (refused.allowed, refused.rule) == (False, "api_key:requests")
    assert refused.retry_after_s == pytest.approx(10, abs=0.5)
    assert (await lim.admit(LimitRequest(api_key_hash="other"))).allowed


async def test_contract_tokens_pre_charge_refund_and_debt(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(RateLimitRule(key="global", tokens_per_minute=600))
    req = LimitRequest(estimated_tokens=200)
    first, second, _ = await admit_all(lim, 3, req)
    refused = await lim.admit(req)
    assert (refused.allowed, refused.rule) == (False, "global:tokens")
    assert refused.retry_after_s == pytest.approx(20, abs=0.5)
    await lim.settle(first.ticket, 0)  # all 200 back
    assert (await lim.admit(req)).allowed
    await lim.settle(second.ticket, 700)  # 500 more
    in_debt = await lim.admit(LimitRequest())
    assert in_debt.retry_after_s == pytest.approx(50, abs=0.5)


async def test_contract_max_concurrent(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(RateLimitRule(key="ip", max_concurrent=3))
    req = LimitRequest(client_ip="10.0.0.1")
    held = await admit_all(lim, 3, req)
    assert [a.allowed for a in held] == [True] * 3
    assert (await lim.admit(req)).rule == "ip:concurrent"
    await lim.settle(held[0].ticket)
    await lim.settle(held[0].ticket)
    assert (await lim.admit(req)).allowed
    assert not (await lim.admit(req)).allowed


async def test_contract_all_rules_must_allow(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(
        RateLimitRule(key="global", requests_per_minute=6),
        RateLimitRule(key="api_key", requests_per_minute=2),
    )
    alice = LimitRequest(api_key_hash="alice")
    assert [(await lim.admit(alice)).rule for _ in range(5)] == [None, None] + [
        "api_key:requests"
    ] * 3
    bob = [await lim.admit(LimitRequest(api_key_hash=f"bob{i}")) for i in range(5)]
    assert [a.allowed for a in bob] == [True] * 4 + [False]
    assert bob[4].rule == "global:requests"
    assert bob[3].headers()["x-ratelimit-remaining-requests"] == "0"


# --- several gateways on one Redis ------------------------------------------


async def test_two_gateways_admit_no_more_than_the_limit_together(
    gateways: Callable[..., RateLimiter],
) -> None:
    rule = RateLimitRule(key="api_key", requests_per_minute=50)
    one, two = gateways(rule), gateways(rule)
    req = LimitRequest(api_key_hash="shared")
    started = time.monotonic()
    results = await asyncio.gather(*(gw.admit(req) for gw in (one, two) for _ in range(50)))
    elapsed = time.monotonic() - started
    admitted = sum(a.allowed for a in results)
    # Exactly 50, plus one per 1.2 s of refill if the burst took that long.
    assert 50 <= admitted <= 50 + math.floor(elapsed / 1.2)
    assert {a.rule for a in results if not a.allowed} == {"api_key:requests"}


async def test_two_gateways_share_concurrency_and_tokens(
    gateways: Callable[..., RateLimiter],
) -> None:
    conc = RateLimitRule(key="global", max_concurrent=50)
    one, two = gateways(conc), gateways(conc)
    results = await asyncio.gather(
        *(gw.admit(LimitRequest()) for gw in (one, two) for _ in range(50))
    )
    held = [a for a in results if a.allowed]
    assert len(held) == 50
    await asyncio.gather(*(one.settle(a.ticket) for a in held[:10]))
    again = await asyncio.gather(*(two.admit(LimitRequest()) for _ in range(20)))
    assert sum(a.allowed for a in again) == 10

    tokens = RateLimitRule(key="api_key", tokens_per_minute=600)
    three, four = gateways(tokens), gateways(tokens)
    req = LimitRequest(api_key_hash="t", estimated_tokens=100)
    mine = await admit_all(three, 3, req)
    theirs = await admit_all(four, 4, req)
    assert [a.allowed for a in mine + theirs] == [True] * 6 + [False]
    await three.settle(mine[0].ticket, 0)
    assert (await four.admit(req)).allowed
    assert not (await three.admit(req)).allowed


async def test_keys_are_hashed_and_expire(
    redis: RedisServer, gateways: Callable[..., RateLimiter]
) -> None:
    gw = gateways(
        RateLimitRule(key="header:x-user", requests_per_minute=10, max_concurrent=2),
        key_prefix="test:rl:",
    )
    await gw.admit(LimitRequest(headers={"x-user": "alice@example.com"}))
    client = Redis.from_url(redis.url)
    try:
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert len(keys) == 2
        assert all(k.startswith("test:rl:header:x-user:") for k in keys)
        assert not any("alice" in k for k in keys)
        ttls = [await client.pttl(k) for k in keys]
        assert 0 < ttls[0] <= 7_000  # the state hash: full again in 6 s
        assert 0 < ttls[1] <= 901_000  # the slot set: the lease
    finally:
        await client.aclose()


async def test_a_crashed_gateway_releases_its_slots_after_the_lease(
    gateways: Callable[..., RateLimiter],
) -> None:
    rule = RateLimitRule(key="global", max_concurrent=1)
    crashed, alive = gateways(rule, lease_s=0.5), gateways(rule, lease_s=0.5)
    assert (await crashed.admit(LimitRequest())).allowed  # never settled
    assert not (await alive.admit(LimitRequest())).allowed
    deadline = time.monotonic() + 5
    while not (await alive.admit(LimitRequest())).allowed:
        assert time.monotonic() < deadline, "slot never expired"
        await asyncio.sleep(0.05)


# --- Redis going away --------------------------------------------------------


async def timed_admits(lim: RateLimiter, n: int) -> list[Admission]:
    """Admissions that must each return within the store timeout (0.2 s) plus
    a margin for a loaded test machine."""
    out = []
    for _ in range(n):
        started = time.monotonic()
        out.append(await lim.admit(LimitRequest(api_key_hash="k")))
        assert time.monotonic() - started < 0.6, "admit waited on a dead Redis"
    return out


async def wait_until_limited(lim: RateLimiter, limit: int, key: str) -> None:
    """Poll until the store answers again, then check it limits: a key not
    seen before gets ``limit`` admissions, then a refusal."""
    deadline = time.monotonic() + 10
    while True:
        first = await lim.admit(LimitRequest(api_key_hash=key))
        # Store down: "allow" admits without a decision (no headers), "deny" refuses.
        if first.rule != "store_unavailable" and first.headers():
            break
        assert time.monotonic() < deadline, "limiting did not resume"
        await asyncio.sleep(0.05)
    assert first.allowed
    rest = await admit_all(lim, limit, LimitRequest(api_key_hash=key))
    assert [a.rule for a in rest] == [None] * (limit - 1) + ["api_key:requests"]


@pytest.mark.parametrize("outage", ["killed", "hung"])
async def test_redis_outage_allow_and_deny_without_hanging(
    outage: str, redis: RedisServer, gateways: Callable[..., RateLimiter]
) -> None:
    rule = RateLimitRule(key="api_key", requests_per_minute=3)
    errors: list[None] = []
    allow = gateways(
        rule, on_store_error="allow", on_error=lambda: errors.append(None), timeout_s=0.2
    )
    deny = gateways(rule, on_store_error="deny", timeout_s=0.2)
    await wait_until_limited(allow, 3, "before-allow")
    await wait_until_limited(deny, 3, "before-deny")
    errors.clear()

    if outage == "killed":
        redis.kill()
    else:
        redis.pause()
    assert all(a.allowed for a in await timed_admits(allow, 20))
    assert errors
    refused = await timed_admits(deny, 20)
    assert {(a.allowed, a.rule) for a in refused} == {(False, "store_unavailable")}

    if outage == "killed":
        redis.restart()
    else:
        redis.resume()
    await wait_until_limited(allow, 3, "after-allow")
    await wait_until_limited(deny, 3, "after-deny")


async def wait_until_answering(lim: RateLimiter) -> None:
    deadline = time.monotonic() + 10
    while True:
        probe = await lim.admit(LimitRequest(api_key_hash="probe"))
        await lim.settle(probe.ticket)
        if probe.headers():
            return
        assert time.monotonic() < deadline, "the store never answered again"
        await asyncio.sleep(0.05)


async def test_a_lost_answer_under_allow_still_releases_the_slot(
    redis: RedisServer, gateways: Callable[..., RateLimiter]
) -> None:
    """Redis hangs after receiving an admission: the gateway admits (allow)
    without knowing whether the slot was taken; settling frees it either way."""
    rule = RateLimitRule(key="global", max_concurrent=1, requests_per_minute=1000)
    gw = gateways(rule, on_store_error="allow", timeout_s=0.2)
    await wait_until_answering(gw)
    redis.pause()
    lost = await gw.admit(LimitRequest())
    assert lost.allowed
    redis.resume()  # Redis now runs the script it had received: the slot is taken
    await asyncio.sleep(0.6)  # past the store's fail-fast backoff
    await gw.settle(lost.ticket)
    again = await gw.admit(LimitRequest())
    assert (again.allowed, again.rule) == (True, None)


async def test_settlement_survives_the_caller_being_cancelled(
    gateways: Callable[..., RateLimiter],
) -> None:
    gw = gateways(RateLimitRule(key="global", max_concurrent=1))
    held = await gw.admit(LimitRequest())
    settling = asyncio.ensure_future(gw.settle(held.ticket))
    await asyncio.sleep(0)  # the settlement is under way
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    deadline = time.monotonic() + 5
    while not (await gw.admit(LimitRequest())).allowed:
        assert time.monotonic() < deadline, "the cancelled settlement never released the slot"
        await asyncio.sleep(0.02)
