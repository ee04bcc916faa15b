from __future__ import annotations

import pytest

from llmproxy.health.slow_start import DEFAULT_FLOOR, slow_start_factor


@pytest.mark.parametrize(
    ("elapsed", "window", "floor", "expected"),
    [
        (0.0, 10.0, 0.1, 0.1),
        (2.5, 10.0, 0.1, 0.325),
        (5.0, 10.0, 0.1, 0.55),
        (9.0, 10.0, 0.1, 0.91),
        (10.0, 10.0, 0.1, 1.0),
        (25.0, 10.0, 0.1, 1.0),
        (-3.0, 10.0, 0.1, 0.1),  # clock skew: the floor, never below it
        (5.0, 10.0, 0.5, 0.75),
        (3.0, 0.0, 0.1, 1.0),  # window 0 = slow start off
        (-3.0, 0.0, 0.1, 1.0),
    ],
)
def test_linear_ramp_values(elapsed: float, window: float, floor: float, expected: float) -> None:
    assert slow_start_factor(elapsed, window, floor) == pytest.approx(expected)


def test_default_floor_is_a_tenth() -> None:
    assert DEFAULT_FLOOR == 0.1
    assert slow_start_factor(0.0, 10.0) == 0.1


def test_ramp_never_decreases_and_stays_in_bounds() -> None:
    values = [slow_start_factor(t / 10, 10.0) for t in range(-20, 130)]
    assert values == sorted(values)
    assert min(values) == 0.1
    assert max(values) == 1.0
