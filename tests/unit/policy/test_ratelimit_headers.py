"""The ``x-ratelimit-*`` and ``retry-after`` headers OpenAI clients read."""

from __future__ import annotations

import pytest

from llmproxy.config.schema import RateLimitRule, RateLimitsConfig
from llmproxy.policy.ratelimit import LimitRequest, RateLimiter, format_reset
from llmproxy.policy.ratelimit_store import MemoryStore


class FakeClock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(*rules: RateLimitRule) -> RateLimiter:
    clock = FakeClock()
    return RateLimiter(RateLimitsConfig(rules=rules), MemoryStore(clock), clock=clock)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),  # rounded up: never too early
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (7.25, "7.25s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3600, "1h0m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_format_reset_like_openai(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


async def test_headers_after_admission() -> None:
    lim = make(RateLimitRule(key="global", requests_per_minute=60, tokens_per_minute=1000))
    a = await lim.admit(LimitRequest(estimated_tokens=100))
    assert a.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
    }


async def test_headers_on_refusal_carry_retry_after() -> None:
    lim = make(RateLimitRule(key="global", requests_per_minute=2, tokens_per_minute=1000))
    await lim.admit(LimitRequest(estimated_tokens=700))
    refused = await lim.admit(LimitRequest(estimated_tokens=500))
    assert refused.rule == "global:tokens"
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "300",
        "x-ratelimit-reset-tokens": "42s",
        "retry-after": "12",
        "retry-after-ms": "12000",
    }


async def test_headers_report_the_tightest_rule_and_the_refusing_one() -> None:
    lim = make(
        RateLimitRule(key="global", requests_per_minute=100),
        RateLimitRule(key="api_key", requests_per_minute=10),
        RateLimitRule(key="ip", tokens_per_minute=50),
    )
    a = await lim.admit(LimitRequest(api_key_hash="k", estimated_tokens=10))
    h = a.headers()
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("10", "9")
    assert "x-ratelimit-limit-tokens" not in h  # no ip: that rule does not apply
    b = await lim.admit(LimitRequest(api_key_hash="k", client_ip="1.2.3.4", estimated_tokens=10))
    assert b.headers()["x-ratelimit-remaining-tokens"] == "40"


async def test_fractional_limits_and_debt_show_zero_remaining() -> None:
    lim = make(RateLimitRule(key="global", requests_per_minute=1.5, tokens_per_minute=100))
    a = await lim.admit(LimitRequest(estimated_tokens=100))
    await lim.settle(a.ticket, 250)
    refused = await lim.admit(LimitRequest())
    h = refused.headers()
    assert h["x-ratelimit-limit-requests"] == "1.5"
    assert h["x-ratelimit-remaining-tokens"] == "0"
    assert h["x-ratelimit-reset-tokens"] == "2m30s"
    assert h["retry-after"] == "90"
