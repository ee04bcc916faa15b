"""Rate limiter decisions on the memory store, exact under a fake clock."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from llmproxy.config.schema import RateLimitRule, RateLimitsConfig
from llmproxy.policy.ratelimit import Admission, LimitRequest, RateLimiter, compile_rules
from llmproxy.policy.ratelimit_store import MemoryStore


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None


def make(*rules: RateLimitRule, clock: FakeClock | None = None) -> tuple[RateLimiter, FakeClock]:
    clock = clock or FakeClock()
    config = RateLimitsConfig(rules=rules)
    return RateLimiter(config, MemoryStore(clock), clock=clock), clock


async def admit_n(lim: RateLimiter, n: int, req: LimitRequest | None = None) -> list[Admission]:
    return [await lim.admit(req or LimitRequest()) for _ in range(n)]


async def test_requests_per_minute_burst_then_one_per_interval() -> None:
    lim, clock = make(RateLimitRule(key="global", requests_per_minute=60))
    assert all(a.allowed for a in await admit_n(lim, 60))
    refused = await lim.admit(LimitRequest())
    assert not refused.allowed
    assert refused.rule == "global:requests"
    assert refused.retry_after_s == pytest.approx(1.0)
    clock.advance(0.5)
    assert (await lim.admit(LimitRequest())).retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert (await lim.admit(LimitRequest())).allowed
    assert not (await lim.admit(LimitRequest())).allowed


async def test_requests_over_any_window_at_most_burst_plus_refill() -> None:
    lim, clock = make(RateLimitRule(key="global", requests_per_minute=600))
    start = clock.now
    admitted = sum(a.allowed for a in await admit_n(lim, 700))
    assert admitted == 600
    for step in range(1, 3001):  # 30 s in 10 ms steps, five tries a step
        clock.now = start + step * 0.01
        admitted += sum(a.allowed for a in await admit_n(lim, 5))
    assert admitted == 600 + 300  # R * (1 + W/60)


async def test_tokens_pre_charge_must_fit() -> None:
    lim, _ = make(RateLimitRule(key="global", tokens_per_minute=1000))
    req = LimitRequest(estimated_tokens=300)
    ok = await admit_n(lim, 3, req)
    assert all(a.allowed for a in ok)
    refused = await lim.admit(req)
    assert (refused.allowed, refused.rule) == (False, "global:tokens")
    assert refused.retry_after_s == pytest.approx(200 / 1000 * 60)  # 100 left, 300 needed
    assert (await lim.admit(LimitRequest(estimated_tokens=100))).allowed
    assert not (await lim.admit(LimitRequest(estimated_tokens=1))).allowed


async def test_settle_refunds_unused_tokens() -> None:
    lim, _ = make(RateLimitRule(key="global", tokens_per_minute=1000))
    req = LimitRequest(estimated_tokens=500)
    a, _ = await admit_n(lim, 2, req)
    assert not (await lim.admit(req)).allowed
    await lim.settle(a.ticket, actual_tokens=100)  # 400 back
    assert (await lim.admit(LimitRequest(estimated_tokens=400))).allowed
    assert not (await lim.admit(LimitRequest(estimated_tokens=1))).allowed


async def test_settle_charges_excess_into_debt() -> None:
    lim, clock = make(RateLimitRule(key="global", tokens_per_minute=1000))
    a = await lim.admit(LimitRequest(estimated_tokens=500))
    await lim.settle(a.ticket, actual_tokens=1800)  # 1300 over: 800 tokens of debt
    refused = await lim.admit(LimitRequest(estimated_tokens=0))
    assert (refused.allowed, refused.rule) == (False, "global:tokens")
    assert refused.retry_after_s == pytest.approx(800 / 1000 * 60)
    clock.advance(48)
    assert (await lim.admit(LimitRequest(estimated_tokens=0))).allowed
    assert (await lim.admit(LimitRequest(estimated_tokens=100))).retry_after_s == pytest.approx(6)


async def test_settle_none_keeps_pre_charge_and_settle_is_idempotent() -> None:
    lim, _ = make(RateLimitRule(key="global", tokens_per_minute=1000, max_concurrent=5))
    a = await lim.admit(LimitRequest(estimated_tokens=600))
    b = await lim.admit(LimitRequest(estimated_tokens=400))
    await lim.settle(a.ticket, None)
    await lim.settle(a.ticket, 0)  # ignored: already settled
    assert not (await lim.admit(LimitRequest(estimated_tokens=1))).allowed
    await lim.settle(b.ticket, 0)
    await lim.settle(b.ticket, 0)
    assert (await lim.admit(LimitRequest(estimated_tokens=400))).allowed
    assert not (await lim.admit(LimitRequest(estimated_tokens=1))).allowed


async def test_pre_charge_above_capacity_fits_only_a_full_bucket() -> None:
    lim, clock = make(RateLimitRule(key="global", tokens_per_minute=1000))
    assert (await lim.admit(LimitRequest(estimated_tokens=10))).allowed
    big = LimitRequest(estimated_tokens=3000)
    assert (await lim.admit(big)).retry_after_s == pytest.approx(0.6)  # until full
    clock.advance(0.6)
    assert (await lim.admit(big)).allowed
    # The whole 3000 was charged: 2000 tokens of debt, 120 s to repay.
    assert (await lim.admit(LimitRequest())).retry_after_s == pytest.approx(120)


async def test_unsettled_long_generations_are_charged_at_admission() -> None:
    lim, clock = make(RateLimitRule(key="api_key", tokens_per_minute=10_000))
    req = LimitRequest(api_key_hash="k", estimated_tokens=1000)
    start = clock.now
    admitted = 0
    for step in range(601):  # one minute, nothing settles
        clock.now = start + step * 0.1
        admitted += (await lim.admit(req)).allowed
    assert admitted == 10 + 10  # C up front, then C per minute of refill


@pytest.mark.parametrize("seed", range(5))
async def test_long_generations_never_overshoot_beyond_the_stated_bound(seed: int) -> None:
    """Random long generations for two simulated minutes: in every window
    starting at 0, charges <= C (1 + W/60) + excess of requests in flight at
    the last admission; with actual <= estimate that excess is 0."""
    rng = random.Random(seed)
    capacity = 20_000
    lim, clock = make(RateLimitRule(key="global", tokens_per_minute=capacity))
    start = clock.now
    in_flight: list[tuple[float, Admission, int, int]] = []  # (end, admission, E, actual)
    charged = 0
    excess_at_last_admission = 0
    for _ in range(1200):  # 0.1 s steps
        for _ in range(rng.randint(0, 3)):
            estimate = 200 + rng.choice([500, 1000, 2000])  # prompt + max_tokens
            actual = rng.randint(100, estimate + 300)  # prompt may be under-estimated
            a = await lim.admit(LimitRequest(estimated_tokens=estimate))
            if a.allowed:
                charged += estimate
                in_flight.append((clock.now + rng.uniform(5, 40), a, estimate, actual))
                excess_at_last_admission = sum(max(0, x[3] - x[2]) for x in in_flight)
        clock.advance(0.1)
        for item in [x for x in in_flight if x[0] <= clock.now]:
            in_flight.remove(item)
            await lim.settle(item[1].ticket, item[3])
            charged += item[3] - item[2]
        window = clock.now - start
        assert charged <= capacity * (1 + window / 60) + excess_at_last_admission + 1


async def test_max_concurrent_released_by_settle_once() -> None:
    lim, _ = make(RateLimitRule(key="global", max_concurrent=2))
    a, b = await admit_n(lim, 2)
    assert a.allowed
    assert b.allowed
    refused = await lim.admit(LimitRequest())
    assert (refused.allowed, refused.rule, refused.retry_after_s) == (False, "global:concurrent", 1)
    await lim.settle(a.ticket)
    await lim.settle(a.ticket)
    assert (await lim.admit(LimitRequest())).allowed
    assert not (await lim.admit(LimitRequest())).allowed


async def test_refused_request_consumes_nothing_from_other_rules() -> None:
    lim, _ = make(
        RateLimitRule(key="global", requests_per_minute=10, max_concurrent=8),
        RateLimitRule(key="api_key", requests_per_minute=2, tokens_per_minute=100),
    )
    alice = LimitRequest(api_key_hash="alice", estimated_tokens=10)
    assert all(a.allowed for a in await admit_n(lim, 2, alice))
    for _ in range(5):
        refused = await lim.admit(alice)
        assert refused.rule == "api_key:requests"
    heavy = LimitRequest(api_key_hash="carol", estimated_tokens=95)
    assert (await lim.admit(heavy)).allowed
    assert (await lim.admit(heavy)).rule == "api_key:tokens"
    # Global saw 3 admissions, not 9: 7 requests and 5 slots left.
    bob = [LimitRequest(api_key_hash=f"bob{i}") for i in range(10)]
    results = [await lim.admit(r) for r in bob]
    assert [a.allowed for a in results] == [True] * 5 + [False] * 5
    assert results[5].rule == "global:concurrent"


async def test_binding_rule_is_the_longest_wait() -> None:
    lim, _ = make(
        RateLimitRule(key="global", requests_per_minute=60),
        RateLimitRule(key="api_key", requests_per_minute=1),
    )
    req = LimitRequest(api_key_hash="k")
    assert (await lim.admit(req)).allowed
    refused = await lim.admit(req)
    assert (refused.rule, refused.retry_after_s) == ("api_key:requests", pytest.approx(60))


@pytest.mark.parametrize(
    ("key", "same", "other", "missing"),
    [
        ("api_key", {"api_key_hash": "a"}, {"api_key_hash": "b"}, {}),
        ("ip", {"client_ip": "10.0.0.1"}, {"client_ip": "10.0.0.2"}, {}),
        ("route", {"route": "chat"}, {"route": "embed"}, {}),
        (
            "header:X-User-Id",
            {"headers": {"x-user-id": "u1"}},
            {"headers": {"x-user-id": "u2"}},
            {"headers": {"x-other": "u1"}},
        ),
    ],
)
async def test_key_kinds(
    key: str, same: dict[str, Any], other: dict[str, Any], missing: dict[str, Any]
) -> None:
    lim, _ = make(RateLimitRule(key=key, requests_per_minute=2))
    same_req = LimitRequest(**same)
    assert all(a.allowed for a in await admit_n(lim, 2, same_req))
    refused = await lim.admit(same_req)
    assert refused.rule == f"{key}:requests"
    assert (await lim.admit(LimitRequest(**other))).allowed
    # A request without the rule's value is not limited by it.
    assert all(a.allowed for a in await admit_n(lim, 10, LimitRequest(**missing)))


async def test_global_key_limits_everyone_and_empty_header_is_a_value() -> None:
    lim, _ = make(
        RateLimitRule(key="global", requests_per_minute=3),
        RateLimitRule(key="header:x-team", requests_per_minute=1),
    )
    empty = LimitRequest(headers={"x-team": ""})
    assert (await lim.admit(empty)).allowed
    assert (await lim.admit(empty)).rule == "header:x-team:requests"
    assert (await lim.admit(LimitRequest(client_ip="1.1.1.1"))).allowed
    assert (await lim.admit(LimitRequest(route="x"))).allowed
    assert (await lim.admit(LimitRequest())).rule == "global:requests"


async def test_per_key_overrides_replace_api_key_rule_values() -> None:
    lim, _ = make(RateLimitRule(key="api_key", requests_per_minute=2, max_concurrent=1))
    vip = LimitRequest(
        api_key_hash="vip", key_limits=Limits(requests_per_minute=5, max_concurrent=9)
    )
    assert all(a.allowed for a in await admit_n(lim, 5, vip))
    assert (await lim.admit(vip)).rule == "api_key:requests"
    # An override left None keeps the rule's value: max_concurrent 1.
    partial = LimitRequest(api_key_hash="p", key_limits=Limits(requests_per_minute=5))
    assert (await lim.admit(partial)).allowed
    assert (await lim.admit(partial)).rule == "api_key:concurrent"
    plain = LimitRequest(api_key_hash="plain")
    assert (await lim.admit(plain)).allowed
    assert (await lim.admit(plain)).rule == "api_key:concurrent"


async def test_per_key_limits_apply_without_an_api_key_rule() -> None:
    lim, _ = make(RateLimitRule(key="global", requests_per_minute=100))
    req = LimitRequest(
        api_key_hash="k", key_limits=Limits(tokens_per_minute=50), estimated_tokens=30
    )
    assert (await lim.admit(req)).allowed
    assert (await lim.admit(req)).rule == "api_key:tokens"
    assert (await lim.admit(LimitRequest(api_key_hash="other", estimated_tokens=30))).allowed


async def test_no_applicable_rule_admits_with_a_noop_ticket() -> None:
    lim, _ = make(RateLimitRule(key="api_key", requests_per_minute=1))
    a = await lim.admit(LimitRequest())
    assert a.allowed
    assert a.headers() == {}
    await lim.settle(a.ticket, 10)


def test_rule_names_are_stable_and_unique() -> None:
    rules = compile_rules(
        (
            RateLimitRule(key="api_key", requests_per_minute=1),
            RateLimitRule(key="api_key", tokens_per_minute=1),
            RateLimitRule(key="header:x-user", requests_per_minute=1),
        )
    )
    assert [r.name for r in rules] == ["api_key", "api_key#2", "header:x-user"]
    assert [r.name for r in compile_rules((RateLimitRule(key="ip", max_concurrent=1),))] == [
        "ip",
        "api_key",  # limitless until a key brings its own limits
    ]
    with pytest.raises(ValueError, match="unknown rate limit key"):
        compile_rules((RateLimitRule(key="cookie", requests_per_minute=1),))
