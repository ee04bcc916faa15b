"""Retry control: what is retried, the waits, and every way it stops."""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import tenacity

from llmproxy.config.schema import RetryConfig
from llmproxy.resilience.budget import RetryBudget
from llmproxy.resilience.retry import (
    JitteredBackoff,
    RetryableError,
    backoff_wait,
    make_retrying,
    parse_retry_after,
)

from .fakes import FakeClock, FakeSleep, MaxRandom

CFG = RetryConfig(backoff_base_s=0.01, backoff_max_s=0.05, retry_after_max_s=2.0)


def roomy_budget() -> RetryBudget:
    return RetryBudget(1.0, 100, 10.0, FakeClock())


class Upstream:
    """One attempt per call: raises the next scripted error, or returns."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def run(
    upstream: Upstream,
    *,
    cfg: RetryConfig = CFG,
    budget: RetryBudget | None = None,
    rng: random.Random | None = None,
    max_attempts: int = 3,
    can_retry: Callable[[RetryableError], bool] = lambda _: True,
    sleep: FakeSleep | None = None,
    first_error: RetryableError | None = None,
    on_budget_exhausted: Callable[[], None] | None = None,
) -> str:
    retrying = make_retrying(
        cfg,
        budget or roomy_budget(),
        rng or random.Random(7),
        max_attempts=max_attempts,
        can_retry=can_retry,
        sleep=sleep or FakeSleep(),
        first_error=first_error,
        on_budget_exhausted=on_budget_exhausted,
    )
    result = "unset"
    async for attempt in retrying:
        with attempt:
            result = await upstream()
    return result


def err(
    kind: str = "connect", *, retry_after_s: float | None = None, status: int | None = None
) -> RetryableError:
    return RetryableError(kind, "boom", retry_after_s, status)


async def test_retries_until_max_attempts_and_raises_the_last_error() -> None:
    errors = [err(), err("timeout"), err("status", status=503)]
    upstream, sleep = Upstream(*errors), FakeSleep()
    with pytest.raises(RetryableError) as info:
        await run(upstream, max_attempts=3, sleep=sleep)
    assert upstream.calls == 3
    assert info.value is errors[-1]
    assert not info.value.budget_exhausted
    assert len(sleep.waits) == 2


async def test_success_after_a_retry() -> None:
    upstream = Upstream(err())
    assert await run(upstream) == "ok"
    assert upstream.calls == 2


async def test_other_exceptions_propagate_unchanged() -> None:
    boom = ValueError("not retryable")
    upstream, sleep = Upstream(boom), FakeSleep()
    with pytest.raises(ValueError, match="not retryable") as info:
        await run(upstream, sleep=sleep)
    assert info.value is boom
    assert upstream.calls == 1
    assert sleep.waits == []


async def test_cancellation_is_not_retried() -> None:
    upstream = Upstream(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await run(upstream)
    assert upstream.calls == 1


async def test_first_error_counts_as_attempt_one() -> None:
    """The forwarder's shape: attempt 1 made directly, the loop does the rest."""
    first = err()
    upstream, sleep = Upstream(err(), err()), FakeSleep()
    budget = roomy_budget()
    with pytest.raises(RetryableError):
        await run(upstream, max_attempts=3, sleep=sleep, budget=budget, first_error=first)
    assert upstream.calls == 2  # attempts 2 and 3
    assert len(sleep.waits) == 2  # a backoff before each of them
    assert budget.snapshot()["retries"] == 2


async def test_first_error_with_no_attempts_left_is_reraised() -> None:
    first = err()
    upstream, budget = Upstream(), roomy_budget()
    with pytest.raises(RetryableError) as info:
        await run(upstream, max_attempts=1, budget=budget, first_error=first)
    assert info.value is first
    assert upstream.calls == 0
    assert budget.snapshot()["retries"] == 0


async def test_budget_denial_stops_and_flags_the_error() -> None:
    budget = RetryBudget(0.0, 1, 10.0, FakeClock())  # exactly one retry
    upstream = Upstream(err(), err(), err(), err())
    exhausted: list[None] = []
    with pytest.raises(RetryableError) as info:
        await run(
            upstream,
            max_attempts=4,
            budget=budget,
            on_budget_exhausted=lambda: exhausted.append(None),
        )
    assert upstream.calls == 2
    assert info.value.budget_exhausted
    assert exhausted == [None]
    assert budget.snapshot()["retries"] == 1


async def test_can_retry_false_stops_before_the_budget_is_spent() -> None:
    seen: list[RetryableError] = []

    def no_backend_left(exc: RetryableError) -> bool:
        seen.append(exc)
        return False

    first, budget = err(), roomy_budget()
    upstream = Upstream(first)
    with pytest.raises(RetryableError) as info:
        await run(upstream, budget=budget, can_retry=no_backend_left)
    assert upstream.calls == 1
    assert seen == [first]
    assert not info.value.budget_exhausted
    assert budget.snapshot()["retries"] == 0


@pytest.mark.parametrize(("retry_on_429", "calls"), [(False, 1), (True, 2)])
async def test_429_retried_only_when_configured(retry_on_429: bool, calls: int) -> None:
    cfg = RetryConfig(retry_on_429=retry_on_429, backoff_base_s=0.01)
    upstream = Upstream(err("ratelimited", status=429))
    if calls == 1:
        with pytest.raises(RetryableError):
            await run(upstream, cfg=cfg)
    else:
        assert await run(upstream, cfg=cfg) == "ok"
    assert upstream.calls == calls


async def test_backoff_grows_exponentially_to_the_cap() -> None:
    sleep = FakeSleep()
    with pytest.raises(RetryableError):
        await run(Upstream(*[err()] * 6), max_attempts=6, rng=MaxRandom(), sleep=sleep)
    assert sleep.waits == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])


def test_jittered_backoff_stays_within_zero_and_the_ceiling() -> None:
    backoff = JitteredBackoff(CFG, random.Random(1234))
    state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
    state.set_exception((RetryableError, err(), None))
    means = []
    for n in range(1, 8):
        state.attempt_number = n
        ceiling = backoff.ceiling(n)
        assert ceiling == min(0.05, 0.01 * 2 ** (n - 1))
        waits = [backoff(state) for _ in range(500)]
        assert all(0.0 <= w <= ceiling for w in waits)
        means.append(sum(waits) / len(waits))
    assert means[0] < means[1] < means[2]  # grows until the cap
    assert isinstance(backoff_wait(CFG, random.Random()), JitteredBackoff)


@pytest.mark.parametrize(
    ("retry_after_s", "expected"),
    [(1.5, 1.5), (30.0, 2.0), (0.0, 0.0), (-3.0, 0.0)],
)
async def test_retry_after_replaces_backoff_up_to_the_cap(
    retry_after_s: float, expected: float
) -> None:
    sleep = FakeSleep()
    upstream = Upstream(err("status", status=503, retry_after_s=retry_after_s), err())
    assert await run(upstream, rng=MaxRandom(), sleep=sleep) == "ok"
    assert sleep.waits == [expected, 0.02]  # then back to backoff (attempt 2)


def test_retryable_error_attributes() -> None:
    e = RetryableError("ratelimited", "HTTP 429", 3.0, 429)
    assert (e.kind, e.detail, e.retry_after_s, e.status) == ("ratelimited", "HTTP 429", 3.0, 429)
    assert not e.budget_exhausted
    assert str(e) == "ratelimited: HTTP 429"


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        (email.utils.format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        ("Fri, 02 Jan 2026 03:04:35 -0000", 30.0),
        (email.utils.format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
        ("inf", None),
        ("Fri, 99 Foo 2026", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW.timestamp()) == expected
