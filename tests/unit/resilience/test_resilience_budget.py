"""The retry budget, on a fake clock."""

from __future__ import annotations

import pytest

from llmproxy.resilience.budget import RetryBudget

from .fakes import FakeClock


def spend_all(budget: RetryBudget, most: int = 1000) -> int:
    """Spend retries until the budget refuses; return how many it allowed."""
    for spent in range(most):
        if not budget.try_spend():
            return spent
    raise AssertionError("budget never refused")


def test_ratio_and_minimum_exact() -> None:
    budget = RetryBudget(0.2, 3, 10.0, FakeClock())
    for _ in range(100):
        budget.record_request()
    assert budget.snapshot() == {"requests": 100, "retries": 0, "allowed_now": 23}
    assert spend_all(budget) == 23
    assert budget.snapshot() == {"requests": 100, "retries": 23, "allowed_now": 0}


def test_minimum_allows_retries_with_no_traffic() -> None:
    budget = RetryBudget(0.2, 3, 10.0, FakeClock())
    assert spend_all(budget) == 3


def test_fractional_share_rounds_as_strict_inequality() -> None:
    # retries < 0.2 * 7 = 1.4 allows 0 and 1: two retries.
    budget = RetryBudget(0.2, 0, 10.0, FakeClock())
    for _ in range(7):
        budget.record_request()
    assert spend_all(budget) == 2


def test_refused_retry_is_not_counted() -> None:
    budget = RetryBudget(0.0, 1, 10.0, FakeClock())
    assert budget.try_spend()
    assert not budget.try_spend()
    assert not budget.try_spend()
    assert budget.snapshot()["retries"] == 1


def test_window_slides_and_forgets_old_counts() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.2, 3, 10.0, clock)
    for _ in range(100):
        budget.record_request()
    assert spend_all(budget) == 23

    clock.advance(5.0)
    for _ in range(10):
        budget.record_request()
    # 110 requests, 23 retries in the window: 22 + 3 - 23 = 2 more.
    assert budget.snapshot() == {"requests": 110, "retries": 23, "allowed_now": 2}

    clock.now = 1009.999  # the first second's bucket still counts
    assert budget.snapshot()["requests"] == 110

    clock.now = 1010.0  # the first second has left the window
    assert budget.snapshot() == {"requests": 10, "retries": 0, "allowed_now": 5}

    clock.advance(5.0)  # t = 15: the second batch has left too
    assert budget.snapshot() == {"requests": 0, "retries": 0, "allowed_now": 3}


def test_long_idle_clears_everything() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.5, 0, 10.0, clock)
    for _ in range(50):
        budget.record_request()
    assert spend_all(budget) == 25
    clock.advance(3600.0)
    assert budget.snapshot() == {"requests": 0, "retries": 0, "allowed_now": 0}
    budget.record_request()
    budget.record_request()
    assert spend_all(budget) == 1


def test_sub_second_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(1.0, 0, 0.5, clock)
    budget.record_request()
    clock.advance(0.25)
    assert budget.snapshot()["requests"] == 1
    clock.advance(0.25)
    assert budget.snapshot()["requests"] == 0


@pytest.mark.parametrize(
    ("ratio", "min_retries", "window_s"),
    [(-0.1, 3, 10.0), (0.2, -1, 10.0), (0.2, 3, 0.0), (float("nan"), 3, 10.0)],
)
def test_rejects_bad_parameters(ratio: float, min_retries: int, window_s: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio, min_retries, window_s, FakeClock())
