"""The memory store's pruning, and the limiter when its store fails."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from llmproxy.config.schema import RateLimitRule, RateLimitsConfig
from llmproxy.policy.ratelimit import LimitRequest, RateLimiter
from llmproxy.policy.ratelimit_store import Check, Decision, MemoryStore, StoreUnavailable


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DownStore:
    """A store whose server is unreachable."""

    def __init__(self) -> None:
        self.calls = 0

    async def admit(self, checks: Sequence[Check], cost: int, ticket_id: str) -> Decision:
        self.calls += 1
        raise StoreUnavailable("connection refused")

    async def settle(self, checks: Sequence[Check], delta_tokens: int, ticket_id: str) -> None:
        self.calls += 1
        raise StoreUnavailable("connection refused")

    async def close(self) -> None:
        pass


def rules(*extra: RateLimitRule) -> tuple[RateLimitRule, ...]:
    return (RateLimitRule(key="ip", requests_per_minute=60, tokens_per_minute=600), *extra)


async def test_idle_buckets_are_pruned() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, prune_interval_s=30)
    lim = RateLimiter(RateLimitsConfig(rules=rules()), store, clock=clock)
    for i in range(1000):
        req = LimitRequest(client_ip=f"10.0.{i // 256}.{i % 256}", estimated_tokens=500)
        assert (await lim.admit(req)).allowed
    assert len(store) == 1000
    clock.advance(30)
    await lim.admit(LimitRequest(client_ip="10.9.9.9"))
    assert len(store) == 1001  # pruned, but every bucket still refills (50 s of tokens)
    clock.advance(30)
    await lim.admit(LimitRequest(client_ip="10.9.9.9"))
    assert len(store) == 1


async def test_buckets_in_flight_or_in_debt_are_kept() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, prune_interval_s=10)
    config = RateLimitsConfig(rules=rules(RateLimitRule(key="api_key", max_concurrent=5)))
    lim = RateLimiter(config, store, clock=clock)
    in_flight = await lim.admit(LimitRequest(api_key_hash="busy"))
    indebted = await lim.admit(LimitRequest(client_ip="1.1.1.1", estimated_tokens=10))
    await lim.settle(indebted.ticket, 6000)  # 5990 tokens over: ~10 minutes of debt
    clock.advance(100)
    store.prune()
    assert len(store) == 2
    await lim.settle(in_flight.ticket)
    clock.advance(600)
    store.prune()
    assert len(store) == 0
    # A refund for a pruned (full) bucket is dropped, not turned into credit.
    await lim.settle(indebted.ticket, 0)
    assert len(store) == 0


async def test_pruning_does_not_change_decisions() -> None:
    clock = FakeClock()
    pruned, kept = MemoryStore(clock, prune_interval_s=1), MemoryStore(clock, prune_interval_s=1e9)
    config = RateLimitsConfig(rules=rules())
    a = RateLimiter(config, pruned, clock=clock)
    b = RateLimiter(config, kept, clock=clock)
    for step in range(2000):
        clock.now = step * 0.37
        req = LimitRequest(client_ip=str(step % 97), estimated_tokens=(step * 13) % 200)
        x, y = await a.admit(req), await b.admit(req)
        assert (x.allowed, x.rule, x.retry_after_s) == (y.allowed, y.rule, y.retry_after_s)
        assert x.headers() == y.headers()
    assert len(pruned) < len(kept)


@pytest.mark.parametrize(("policy", "allowed"), [("allow", True), ("deny", False)])
async def test_store_errors_follow_on_store_error(
    policy: str, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    errors: list[None] = []
    lim = RateLimiter(
        RateLimitsConfig(on_store_error=policy, rules=rules()),
        DownStore(),
        clock=clock,
        on_store_error=lambda: errors.append(None),
        log_interval_s=10,
    )
    with caplog.at_level(logging.WARNING, logger="llmproxy.policy.ratelimit"):
        for _ in range(50):
            a = await lim.admit(LimitRequest(client_ip="1.2.3.4"))
            assert a.allowed is allowed
            await lim.settle(a.ticket, 5)  # nothing was charged: nothing to settle
        clock.advance(10)
        await lim.admit(LimitRequest(client_ip="1.2.3.4"))
    assert len(errors) == 51  # counted every time
    assert len(caplog.records) == 2  # logged once per interval
    assert "50 store errors since last report" in caplog.records[1].getMessage()
    if not allowed:
        assert (a.rule, a.retry_after_s) == ("store_unavailable", 1.0)
        assert a.headers() == {"retry-after": "1", "retry-after-ms": "1000"}


async def test_settle_error_is_counted_not_raised() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    errors: list[None] = []
    lim = RateLimiter(
        RateLimitsConfig(rules=(RateLimitRule(key="global", max_concurrent=1),)),
        store,
        clock=clock,
        on_store_error=lambda: errors.append(None),
    )
    a = await lim.admit(LimitRequest())
    lim._store = DownStore()  # the server goes away while the request runs
    await lim.settle(a.ticket, 10)
    await lim.settle(a.ticket, 10)
    assert len(errors) == 1
    assert a.ticket.settled


async def test_a_rebuilt_limiter_keeps_the_state_of_rules_that_keep_their_name() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    old = RateLimiter(
        RateLimitsConfig(rules=(RateLimitRule(key="ip", requests_per_minute=2),)),
        store,
        clock=clock,
    )
    req = LimitRequest(client_ip="1.1.1.1", route="chat")
    assert (await old.admit(req)).allowed
    # Reload: a rule added in front, the ip rule's limit raised.
    new = RateLimiter(
        RateLimitsConfig(
            rules=(
                RateLimitRule(key="route", requests_per_minute=100),
                RateLimitRule(key="ip", requests_per_minute=3),
            )
        ),
        store,
        clock=clock,
    )
    # The old admission left 30 s of backlog: 1.5 of the new 3 requests.
    assert [(await new.admit(req)).rule for _ in range(2)] == [None, "ip:requests"]
