"""Canary analysis and rollback, on a fake clock: every time is a plain float."""

from __future__ import annotations

import dataclasses

import pytest

from llmproxy.config.schema import SplitTarget
from llmproxy.policy.canary import (
    CanaryAnalyzer,
    CanaryConfig,
    apply_weight,
    canary_percent,
    canary_problems,
)

STEPS = (5.0, 25.0, 50.0, 100.0)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(**changes: object) -> CanaryConfig:
    base = CanaryConfig(canary_pool="canary", stable_pool="stable", min_samples=50)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def analyzer(clock: Clock | None = None, **changes: object) -> CanaryAnalyzer:
    return CanaryAnalyzer(config(**changes), clock or Clock(), initial_weight=10)


def feed(
    a: CanaryAnalyzer,
    pool: str,
    n: int,
    *,
    errors: int = 0,
    ttfb_s: float | None = 0.2,
    start: float = 0.0,
    end: float = 10.0,
) -> None:
    """``n`` outcomes evenly over ``[start, end)``, the first ``errors`` of them failed."""
    for i in range(n):
        a.record(pool, i >= errors, ttfb_s, start + (end - start) * i / n)


def test_no_verdict_below_min_samples_on_either_side() -> None:
    a = analyzer()
    feed(a, "canary", 49, errors=49)
    feed(a, "stable", 500)
    verdict = a.evaluate(10.0)
    assert verdict.state == "insufficient_data"
    assert verdict.weight == 10
    assert not verdict.changed
    assert "n=49/500" in verdict.reason
    b = analyzer()
    feed(b, "canary", 100, errors=100)
    feed(b, "stable", 49)
    assert b.evaluate(10.0).state == "insufficient_data"


def test_error_rate_regression_rolls_back_at_once_naming_the_rates() -> None:
    a = analyzer()
    feed(a, "canary", 100, errors=30)
    feed(a, "stable", 1000)
    verdict = a.evaluate(10.0)
    assert verdict.state == "rolled_back"
    assert verdict.weight == 0
    assert verdict.changed
    assert verdict.reason == (
        "canary error rate 30.0% vs stable 0.0% (+30.0% > +5.0%) over 60s, n=100/1000"
    )
    assert a.snapshot(10.0).rolled_back_at == 10.0


def test_error_margin_is_absolute_over_the_stable_rate() -> None:
    within = analyzer()
    feed(within, "canary", 100, errors=6)
    feed(within, "stable", 100, errors=2)
    assert within.evaluate(10.0).state == "observing"
    beyond = analyzer()
    feed(beyond, "canary", 100, errors=8)
    feed(beyond, "stable", 100, errors=2)
    verdict = beyond.evaluate(10.0)
    assert verdict.state == "rolled_back"
    assert "8.0% vs stable 2.0% (+6.0% > +5.0%)" in verdict.reason


def test_ttfb_p95_regression_rolls_back() -> None:
    a = analyzer()
    feed(a, "canary", 100, ttfb_s=0.4)
    feed(a, "stable", 100, ttfb_s=0.2)
    verdict = a.evaluate(10.0)
    assert verdict.state == "rolled_back"
    assert verdict.weight == 0
    assert "TTFB p95" in verdict.reason
    assert "2.00x > 1.50x" in verdict.reason


def test_ttfb_within_ratio_and_tail_below_p95_pass() -> None:
    a = analyzer()
    feed(a, "canary", 100, ttfb_s=0.25)
    feed(a, "canary", 4, ttfb_s=30.0)  # Under 5 %: beyond the p95.
    feed(a, "stable", 100, ttfb_s=0.2)
    assert a.evaluate(10.0).state == "observing"
    snap = a.snapshot(10.0)
    p95 = snap.canary.ttfb_p95_s
    assert p95 is not None
    assert 0.25 <= p95 < 0.25 * 1.0905
    assert snap.stable.ttfb_samples == 100


def test_latency_is_not_judged_on_too_few_ttfb_samples() -> None:
    a = analyzer()
    feed(a, "canary", 100, ttfb_s=None)  # Failed before the first byte, say.
    feed(a, "canary", 10, ttfb_s=5.0)
    feed(a, "stable", 100, ttfb_s=0.2)
    assert a.evaluate(10.0).state == "observing"


def test_progressive_steps_advance_each_interval_to_promoted() -> None:
    clock = Clock(0.0)
    a = CanaryAnalyzer(config(steps=STEPS, step_interval_s=300), clock)
    assert a.weight == 5
    seen: list[tuple[float, str, float, bool]] = []
    for t in range(0, 1000, 10):
        feed(a, "canary", 10, start=t, end=t + 10)
        feed(a, "stable", 100, start=t, end=t + 10)
        v = a.evaluate(t + 10)
        seen.append((t + 10, v.state, v.weight, v.changed))
    changes = [(t, state, weight) for t, state, weight, changed in seen if changed]
    assert changes == [
        (300, "promoting", 25),
        (600, "promoting", 50),
        (900, "promoted", 100),
    ]
    assert seen[0][1] == "insufficient_data"  # 10 canary outcomes after 10 s.
    assert seen[10][1:] == ("promoting", 5, False)
    assert seen[-1][1:] == ("promoted", 100, False)
    assert a.snapshot(1000.0).next_step_at is None


def test_steps_wait_for_enough_samples() -> None:
    a = CanaryAnalyzer(config(steps=STEPS, step_interval_s=300), Clock(0.0))
    feed(a, "stable", 100, start=250, end=350)
    assert a.evaluate(350).weight == 5  # Due, but no canary data: hold.
    assert a.snapshot(350).next_step_at == 300
    feed(a, "canary", 50, start=350, end=360)
    feed(a, "stable", 50, start=350, end=360)
    verdict = a.evaluate(360)
    assert (verdict.state, verdict.weight, verdict.changed) == ("promoting", 25, True)
    assert a.snapshot(360).next_step_at == 660


def test_blue_green_is_one_step() -> None:
    a = CanaryAnalyzer(config(steps=(100.0,)), Clock(0.0), initial_weight=0)
    feed(a, "canary", 50)
    feed(a, "stable", 50)
    assert a.evaluate(10).state == "promoting"
    feed(a, "canary", 50, start=300, end=310)
    feed(a, "stable", 50, start=300, end=310)
    verdict = a.evaluate(310)
    assert (verdict.state, verdict.weight, verdict.changed) == ("promoted", 100, True)


def test_rollback_is_sticky_until_reset() -> None:
    clock = Clock(0.0)
    a = CanaryAnalyzer(config(steps=STEPS), clock)
    feed(a, "canary", 100, errors=50)
    feed(a, "stable", 100)
    assert a.evaluate(10).state == "rolled_back"
    feed(a, "canary", 100, start=500, end=510)
    feed(a, "stable", 100, start=500, end=510)
    later = a.evaluate(510)  # Healthy now, and a step is long due: still rolled back.
    assert (later.state, later.weight, later.changed) == ("rolled_back", 0, False)
    assert a.snapshot(510).next_step_at is None
    clock.now = 520
    reset = a.reset()
    assert (reset.state, reset.weight, reset.changed) == ("insufficient_data", 5, True)
    assert a.snapshot().rolled_back_at is None
    assert a.snapshot().next_step_at == 820
    feed(a, "canary", 100, start=520, end=530)
    feed(a, "stable", 100, start=520, end=530)
    assert a.evaluate(530).state == "promoting"


def test_reset_clears_old_canary_failures() -> None:
    a = analyzer()
    feed(a, "canary", 100, errors=50)
    feed(a, "stable", 100)
    a.reset(10)
    feed(a, "canary", 50, start=10, end=20)
    feed(a, "stable", 50, start=10, end=20)
    assert a.evaluate(20).state == "observing"


def test_operator_rollback_and_promote() -> None:
    clock = Clock(42.0)
    a = CanaryAnalyzer(config(steps=STEPS), clock)
    back = a.rollback("bad outputs")
    assert (back.state, back.weight, back.changed) == ("rolled_back", 0, True)
    assert back.reason == "rolled back by an operator: bad outputs"
    assert a.snapshot().rolled_back_at == 42.0
    assert not a.rollback().changed
    up = a.promote()
    assert (up.state, up.weight, up.changed) == ("promoted", 100, True)
    assert a.snapshot().rolled_back_at is None
    feed(a, "canary", 100, errors=100)
    feed(a, "stable", 100)
    assert a.evaluate(10).state == "promoted"  # No stable to compare with any more.
    assert a.rollback("regret").weight == 0


def test_window_sliding_forgets_old_failures() -> None:
    a = analyzer()
    feed(a, "canary", 100, errors=100, start=0, end=10)
    feed(a, "canary", 100, start=40, end=50)
    feed(a, "stable", 200, start=0, end=80)
    feed(a, "canary", 100, start=70, end=80)
    assert a.snapshot(50).canary.errors == 100
    snap = a.snapshot(80)  # The window holds (25, 80]: the failures at 0-10 are gone.
    assert (snap.canary.requests, snap.canary.errors) == (200, 0)
    assert a.evaluate(80).state == "observing"


def test_late_outcomes_older_than_the_window_are_dropped() -> None:
    a = analyzer()
    feed(a, "canary", 50, start=100, end=110)
    a.record("canary", False, None, 45.0)  # Same ring slot, an older turn.
    assert a.snapshot(110).canary.errors == 0


def test_other_pools_are_ignored() -> None:
    a = analyzer()
    feed(a, "fallback", 100, errors=100)
    snap = a.snapshot(10)
    assert snap.canary.requests == snap.stable.requests == 0
    assert snap.canary.error_rate is None
    assert snap.canary.ttfb_p95_s is None


def test_disabled_analysis_never_changes_the_weight() -> None:
    a = analyzer(enabled=False)
    feed(a, "canary", 100, errors=100)
    feed(a, "stable", 100)
    verdict = a.evaluate(10)
    assert (verdict.state, verdict.weight, verdict.changed) == ("observing", 10, False)


def test_snapshot_is_json_ready() -> None:
    a = analyzer()
    feed(a, "canary", 60, errors=3)
    feed(a, "stable", 100, errors=1)
    a.evaluate(10)
    data = dataclasses.asdict(a.snapshot(10))
    assert data["state"] == "observing"
    assert data["canary"]["error_rate"] == pytest.approx(0.05)
    assert data["stable"]["requests"] == 100


def test_config_problems_and_bad_weights() -> None:
    assert canary_problems(config(steps=STEPS), ["stable", "canary"]) == []
    problems = dict(
        canary_problems(
            config(stable_pool="canary", steps=(50.0, 25.0), max_ttfb_p95_ratio=0.5), ["x"]
        )
    )
    assert problems.keys() == {"canary_pool", "stable_pool", "steps", "max_ttfb_p95_ratio"}
    assert (
        "in (0, 100]" in dict(canary_problems(config(steps=(0.0,)), ["canary", "stable"]))["steps"]
    )
    with pytest.raises(ValueError, match="rise strictly"):
        CanaryAnalyzer(config(steps=(5.0, 5.0)), Clock())
    with pytest.raises(ValueError, match="initial_weight"):
        CanaryAnalyzer(config(), Clock())
    with pytest.raises(ValueError, match="percentage"):
        analyzer().reset(101)


def test_apply_weight_keeps_the_others_proportions() -> None:
    split = (SplitTarget("stable", 90), SplitTarget("canary", 10))
    assert apply_weight(split, "canary", 25) == (
        SplitTarget("stable", 75),
        SplitTarget("canary", 25),
    )
    assert apply_weight(split, "canary", 0) == (
        SplitTarget("stable", 100),
        SplitTarget("canary", 0),
    )
    three = (SplitTarget("a", 60), SplitTarget("canary", 10), SplitTarget("b", 30))
    out = apply_weight(three, "canary", 40)
    assert [t.pool for t in out] == ["a", "canary", "b"]
    assert [t.weight for t in out] == pytest.approx([40, 40, 20])
    assert canary_percent(three, "canary") == 10
    assert canary_percent(out, "canary") == 40


def test_apply_weight_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="not in the split"):
        apply_weight((SplitTarget("stable", 1),), "canary", 5)
    with pytest.raises(ValueError, match="besides"):
        apply_weight((SplitTarget("canary", 1),), "canary", 5)
    with pytest.raises(ValueError, match="percentage"):
        apply_weight((SplitTarget("stable", 1), SplitTarget("canary", 1)), "canary", -1)
