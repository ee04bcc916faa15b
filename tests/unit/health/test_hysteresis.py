"""Hysteresis: exact sequences of probe results and the flips they cause."""

from __future__ import annotations

import pytest

from llmproxy.health.hysteresis import Hysteresis

P, F = True, False


def feed(h: Hysteresis, results: list[bool]) -> list[bool | None]:
    return [h.observe(r) for r in results]


def test_thresholds_2_2_go_down_and_come_back() -> None:
    h = Hysteresis(healthy_threshold=2, unhealthy_threshold=2)
    assert h.healthy
    assert feed(h, [F, F, F, P, P, P]) == [None, False, None, None, True, None]
    assert h.healthy


def test_thresholds_3_1_one_failure_down_three_passes_up() -> None:
    h = Hysteresis(healthy_threshold=3, unhealthy_threshold=1)
    assert feed(h, [P, F]) == [None, False]
    assert not h.healthy
    assert feed(h, [P, P, F, P, P, P]) == [None, None, None, None, None, True]
    assert h.healthy
    assert feed(h, [F]) == [False]


@pytest.mark.parametrize("initially_healthy", [True, False])
def test_flapping_never_flips_with_thresholds_of_two(initially_healthy: bool) -> None:
    h = Hysteresis(2, 2, initially_healthy=initially_healthy)
    assert feed(h, [P, F] * 20) == [None] * 40
    assert feed(h, [P] + [F, P] * 20) == [None] * 41
    assert h.healthy is initially_healthy


def test_a_pass_resets_the_failure_streak() -> None:
    h = Hysteresis(healthy_threshold=3, unhealthy_threshold=3)
    assert feed(h, [F, F, P, F, F]) == [None] * 5
    assert h.healthy
    assert h.consecutive_failures == 2
    assert h.observe(F) is False


def test_a_failure_resets_the_pass_streak() -> None:
    h = Hysteresis(healthy_threshold=3, unhealthy_threshold=3, initially_healthy=False)
    assert feed(h, [P, P, F, P, P]) == [None] * 5
    assert not h.healthy
    assert h.consecutive_passes == 2
    assert h.observe(P) is True


def test_initially_unhealthy_needs_the_full_pass_streak() -> None:
    h = Hysteresis(healthy_threshold=2, unhealthy_threshold=5, initially_healthy=False)
    assert not h.healthy
    assert feed(h, [P, P]) == [None, True]


def test_flip_happens_once_and_streaks_keep_counting() -> None:
    h = Hysteresis(2, 2)
    assert feed(h, [F, F, F, F]) == [None, False, None, None]
    assert (h.consecutive_failures, h.consecutive_passes) == (4, 0)
    assert feed(h, [P]) == [None]
    assert (h.consecutive_failures, h.consecutive_passes) == (0, 1)


def test_passes_while_healthy_change_nothing() -> None:
    h = Hysteresis(1, 1)
    assert feed(h, [P, P, P]) == [None, None, None]
    assert feed(h, [F, P]) == [False, True]


@pytest.mark.parametrize(("healthy", "unhealthy"), [(0, 1), (1, 0), (-1, 2)])
def test_thresholds_below_one_are_refused(healthy: int, unhealthy: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Hysteresis(healthy, unhealthy)
