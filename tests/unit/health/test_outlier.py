from __future__ import annotations

import pytest

from llmproxy.config.schema import OutlierConfig
from llmproxy.health.outlier import Ejection, OutlierDetector

FAST, SLOW = 0.1, 1.0  # TTFB, seconds


def cfg(**overrides: float | int | bool) -> OutlierConfig:
    base: dict[str, float | int | bool] = {
        "consecutive_failures": 3,
        "base_ejection_s": 10.0,
        "max_ejection_s": 300.0,
        "max_ejection_percent": 50.0,
        "latency_factor": 3.0,
        "latency_min_samples": 10,
        "latency_alpha": 0.2,
    }
    base.update(overrides)
    return OutlierConfig(**base)  # type: ignore[arg-type]


def names(n: int) -> list[str]:
    return [f"b{i}" for i in range(n)]


def fail(det: OutlierDetector, name: str, now: float, times: int) -> list[Ejection | None]:
    return [det.on_failure(name, now) for _ in range(times)]


def feed(det: OutlierDetector, name: str, ttfb: float, times: int) -> None:
    for _ in range(times):
        det.on_success(name, 0.0, ttfb)


# -- consecutive failures ------------------------------------------------------


def test_ejects_exactly_at_the_threshold() -> None:
    det = OutlierDetector(cfg(), ["a", "b", "c"])
    assert det.on_failure("a", 1.0) is None
    assert det.on_failure("a", 2.0) is None
    assert not det.is_ejected("a", 2.0)
    assert det.on_failure("a", 3.0) == Ejection("a", 13.0, 1, "consecutive_failures")
    assert det.is_ejected("a", 3.0)
    assert det.is_ejected("a", 12.999)
    assert not det.is_ejected("a", 13.0)
    assert det.ejected_until("a") == 13.0
    assert not det.is_ejected("b", 3.0)


def test_a_success_resets_the_run() -> None:
    det = OutlierDetector(cfg(), ["a", "b"])
    assert fail(det, "a", 0.0, 2) == [None, None]
    det.on_success("a", 0.0, None)
    assert fail(det, "a", 0.0, 2) == [None, None]
    assert det.snapshot("a", 0.0)["consecutive_failures"] == 2
    assert det.on_failure("a", 0.0) is not None


def test_failures_while_ejected_are_not_counted() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1), ["a", "b"])
    assert det.on_failure("a", 0.0) is not None
    assert fail(det, "a", 5.0, 4) == [None] * 4  # requests sent before the ejection
    assert det.snapshot("a", 5.0)["consecutive_failures"] == 0
    assert det.ejected_until("a") == 10.0


def test_ejection_durations_grow_by_base_and_cap_at_max() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1, max_ejection_s=45.0), ["a", "b"])
    now, durations, counts = 0.0, [], []
    for _ in range(6):
        ej = det.on_failure("a", now)  # fails again the moment it returns
        assert ej is not None
        durations.append(ej.until - now)
        counts.append(ej.count)
        now = ej.until
    assert durations == [10.0, 20.0, 30.0, 40.0, 45.0, 45.0]
    assert counts == [1, 2, 3, 4, 5, 6]


# -- max_ejection_percent ----------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "percent", "ejected"),
    [
        (3, 50.0, 1),  # a second would be 67 % > 50 %
        (10, 50.0, 5),  # 5/10 = 50 % is allowed, 6/10 is not
        (10, 25.0, 2),  # 3/10 = 30 % > 25 %
        (10, 10.0, 1),
        (2, 0.0, 1),  # one may always be ejected...
        (3, 100.0, 2),  # ...but never the last one standing
        (4, 100.0, 3),
        (2, 100.0, 1),
        (1, 100.0, 0),  # so a pool of one never ejects
    ],
)
def test_max_ejection_percent(size: int, percent: float, ejected: int) -> None:
    det = OutlierDetector(cfg(consecutive_failures=1, max_ejection_percent=percent), names(size))
    results = [det.on_failure(n, 0.0) for n in names(size)]
    assert [r is not None for r in results] == [True] * ejected + [False] * (size - ejected)
    assert [det.is_ejected(n, 0.0) for n in names(size)] == [r is not None for r in results]


def test_pool_of_three_refuses_the_second_and_third() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1), ["a", "b", "c"])
    assert det.on_failure("a", 0.0) is not None
    assert det.on_failure("b", 0.0) is None
    assert det.on_failure("c", 0.0) is None
    assert det.snapshot("b", 0.0)["consecutive_failures"] == 1  # the run is kept


def test_a_refused_ejection_happens_once_room_frees_up() -> None:
    det = OutlierDetector(cfg(consecutive_failures=2), ["a", "b", "c"])
    assert fail(det, "a", 0.0, 2)[-1] is not None  # until 10
    assert fail(det, "b", 1.0, 5) == [None] * 5  # refused at 2, 3, 4, 5 failures
    assert det.on_failure("b", 9.999) is None
    assert det.on_failure("b", 10.0) == Ejection("b", 20.0, 1)  # a is back


# -- decay of the ejection count --------------------------------------------------


def test_times_ejected_decays_after_max_ejection_s_un_ejected() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1, max_ejection_s=100.0), ["a", "b"])
    assert det.on_failure("a", 0.0) == Ejection("a", 10.0, 1)
    assert det.on_failure("a", 10.0) == Ejection("a", 30.0, 2)
    # Back at 30; the count holds for one full max_ejection_s, then drops by one
    # per further max_ejection_s.
    assert det.snapshot("a", 129.9)["times_ejected"] == 2
    assert det.snapshot("a", 130.0)["times_ejected"] == 1
    assert det.snapshot("a", 229.9)["times_ejected"] == 1
    assert det.snapshot("a", 230.0)["times_ejected"] == 0
    assert det.snapshot("a", 999.0)["times_ejected"] == 0
    assert det.on_failure("a", 1000.0) == Ejection("a", 1010.0, 1)


def test_decay_shortens_the_next_ejection() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1, max_ejection_s=100.0), ["a", "b"])
    det.on_failure("a", 0.0)
    det.on_failure("a", 10.0)  # count 2, back at 30
    assert det.on_failure("a", 130.0) == Ejection("a", 150.0, 2)  # 1 after decay, +1


def test_no_decay_while_ejected() -> None:
    det = OutlierDetector(
        cfg(consecutive_failures=1, base_ejection_s=50.0, max_ejection_s=50.0), ["a", "b"]
    )
    det.on_failure("a", 0.0)
    assert det.on_failure("a", 50.0) == Ejection("a", 100.0, 2)
    assert det.snapshot("a", 99.0)["times_ejected"] == 2
    assert det.snapshot("a", 150.0)["times_ejected"] == 1


# -- expired -------------------------------------------------------------------------


def test_expired_reports_each_return_once_in_order() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1, max_ejection_percent=100.0), names(4))
    det.on_failure("b1", 1.0)  # until 11
    det.on_failure("b0", 0.0)  # until 10
    assert det.expired(9.9) == []
    assert det.expired(10.0) == ["b0"]
    assert det.expired(20.0) == ["b1"]
    assert det.expired(30.0) == []


def test_a_backend_ejected_again_before_the_pool_asked_is_not_reported() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1, max_ejection_percent=100.0), names(4))
    det.on_failure("b0", 0.0)  # until 10
    assert det.on_failure("b0", 10.0) == Ejection("b0", 30.0, 2)  # back and out again
    assert det.expired(10.0) == []
    assert det.expired(30.0) == ["b0"]


# -- set_backends ---------------------------------------------------------------------


def test_set_backends_keeps_those_that_stay_and_clears_the_rest() -> None:
    det = OutlierDetector(cfg(consecutive_failures=2), ["a", "b", "c"])
    det.on_failure("a", 0.0)
    feed(det, "a", FAST, 4)
    det.on_failure("a", 0.0)
    fail(det, "b", 0.0, 2)  # ejected until 10
    fail(det, "c", 0.0, 1)

    det.set_backends(["a", "b", "d"])
    assert det.snapshot("a", 1.0)["consecutive_failures"] == 1
    assert det.snapshot("a", 1.0)["samples"] == 4
    assert det.is_ejected("b", 1.0)
    assert det.snapshot("d", 1.0) == {
        "consecutive_failures": 0,
        "ejected": False,
        "ejected_until_in_s": 0.0,
        "times_ejected": 0,
        "ttfb_ewma_ms": None,
        "samples": 0,
        "weight_factor": 1.0,
    }
    # c is gone: its outcomes are ignored; back again, it starts clean.
    assert det.on_failure("c", 1.0) is None
    assert not det.is_ejected("c", 1.0)
    with pytest.raises(KeyError):
        det.snapshot("c", 1.0)
    det.set_backends(["a", "b", "c", "d"])
    assert det.snapshot("c", 1.0)["consecutive_failures"] == 0


def test_a_removed_backend_is_never_reported_as_returned() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1), ["a", "b", "c"])
    det.on_failure("a", 0.0)
    det.set_backends(["b", "c"])
    assert det.expired(100.0) == []
    det.set_backends(["a", "b", "c"])  # re-added: clean, not ejected
    assert not det.is_ejected("a", 1.0)
    assert det.expired(200.0) == []


def test_set_backends_can_swap_the_config() -> None:
    det = OutlierDetector(cfg(), ["a", "b"])
    det.set_backends(["a", "b"], cfg(consecutive_failures=1, base_ejection_s=7.0))
    assert det.on_failure("a", 0.0) == Ejection("a", 7.0, 1)


# -- latency --------------------------------------------------------------------------


def slow_pool() -> OutlierDetector:
    det = OutlierDetector(cfg(), ["f0", "f1", "f2", "slow"])
    for name in ("f0", "f1", "f2"):
        feed(det, name, FAST, 10)
    feed(det, "slow", SLOW, 10)
    return det


def test_a_ten_times_slower_backend_gets_a_tenth_of_its_weight() -> None:
    det = slow_pool()
    assert det.weight_factor("slow") == pytest.approx(0.1)
    assert [det.weight_factor(n) for n in ("f0", "f1", "f2")] == [1.0, 1.0, 1.0]
    assert det.latency_outliers() == {"slow"}
    assert not det.is_ejected("slow", 0.0)  # cut, not ejected
    snap = det.snapshot("slow", 0.0)
    assert snap["ttfb_ewma_ms"] == pytest.approx(1000.0)
    assert snap["samples"] == 10
    assert snap["weight_factor"] == pytest.approx(0.1)


def test_the_cut_is_floored_so_a_trickle_remains() -> None:
    det = OutlierDetector(cfg(), ["f0", "f1", "slow"])
    feed(det, "f0", FAST, 10)
    feed(det, "f1", FAST, 10)
    feed(det, "slow", 100 * FAST, 10)
    assert det.weight_factor("slow") == 0.05


def test_no_cut_below_min_samples() -> None:
    det = OutlierDetector(cfg(), ["f0", "f1", "f2", "slow"])
    for name in ("f0", "f1", "f2"):
        feed(det, name, FAST, 10)
    feed(det, "slow", SLOW, 9)
    assert det.weight_factor("slow") == 1.0
    det.on_success("slow", 0.0, SLOW)
    assert det.weight_factor("slow") == pytest.approx(0.1)


def test_no_cut_unless_two_backends_have_enough_samples() -> None:
    det = OutlierDetector(cfg(), ["fast", "slow"])
    feed(det, "fast", FAST, 9)
    feed(det, "slow", SLOW, 10)
    assert det.weight_factor("slow") == 1.0
    det.on_success("fast", 0.0, FAST)
    # A pool of two can tell its slow half: the median is the lower middle value.
    assert det.weight_factor("slow") == pytest.approx(0.1)
    assert det.weight_factor("fast") == 1.0


def test_at_the_factor_no_cut_just_above_it_a_cut() -> None:
    det = OutlierDetector(cfg(), ["f0", "f1", "edge"])
    feed(det, "f0", 1.0, 10)
    feed(det, "f1", 1.0, 10)
    feed(det, "edge", 3.0, 10)
    assert det.weight_factor("edge") == 1.0
    det.on_success("edge", 0.0, 3.5)  # EWMA 3.1 > 3 x 1.0
    assert det.weight_factor("edge") == pytest.approx(1.0 / 3.1)


def test_recovers_when_the_slow_backend_speeds_up() -> None:
    det = slow_pool()
    # EWMA after k fast samples: 0.1 + 0.9 * 0.8**k; uncut once <= 0.3 (k >= 7).
    feed(det, "slow", FAST, 6)
    assert det.weight_factor("slow") == pytest.approx(FAST / (0.1 + 0.9 * 0.8**6))
    det.on_success("slow", 0.0, FAST)
    assert det.weight_factor("slow") == 1.0
    assert det.latency_outliers() == set()


def test_a_pool_wide_slowdown_cuts_no_one_once_the_median_catches_up() -> None:
    det = OutlierDetector(cfg(), names(4))
    for name in names(4):
        feed(det, name, FAST, 10)
    for _ in range(30):
        for name in names(4):
            det.on_success(name, 0.0, SLOW)
    assert [det.weight_factor(n) for n in names(4)] == [1.0] * 4


class CountingDetector(OutlierDetector):
    """Counts how often the pool median is re-sorted."""

    sorts = 0

    def _refresh_median(self) -> None:
        self.sorts += 1
        super()._refresh_median()


def test_steady_traffic_does_not_resort_the_median() -> None:
    det = CountingDetector(cfg(), names(4))
    for _ in range(1_000):
        for name in names(4):
            det.on_success(name, 0.0, FAST)
    # Once at start, once as each backend reaches latency_min_samples.
    assert det.sorts == 5


def test_latency_factor_zero_turns_the_cut_off() -> None:
    det = OutlierDetector(cfg(latency_factor=0.0), ["f0", "f1", "slow"])
    feed(det, "f0", FAST, 10)
    feed(det, "f1", FAST, 10)
    feed(det, "slow", SLOW, 10)
    assert det.weight_factor("slow") == 1.0


# -- disabled, unknown names, snapshot ---------------------------------------------


def test_disabled_never_ejects_and_never_cuts() -> None:
    det = OutlierDetector(cfg(enabled=False, consecutive_failures=1), ["f0", "f1", "f2", "slow"])
    assert fail(det, "f0", 0.0, 100) == [None] * 100
    assert not det.is_ejected("f0", 0.0)
    assert det.snapshot("f0", 0.0)["consecutive_failures"] == 100
    for name in ("f0", "f1", "f2"):
        feed(det, name, FAST, 10)
    feed(det, "slow", SLOW, 10)
    assert det.weight_factor("slow") == 1.0
    assert det.latency_outliers() == set()


def test_unknown_names_are_ignored() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1), ["a", "b"])
    det.on_success("zz", 0.0, 1.0)
    assert det.on_failure("zz", 0.0) is None
    assert not det.is_ejected("zz", 0.0)
    assert det.ejected_until("zz") == 0.0
    assert det.weight_factor("zz") == 1.0


def test_snapshot_of_an_ejected_backend() -> None:
    det = OutlierDetector(cfg(consecutive_failures=1), ["a", "b"])
    det.on_success("a", 0.0, 0.25)
    det.on_failure("a", 100.0)
    assert det.snapshot("a", 104.0) == {
        "consecutive_failures": 0,
        "ejected": True,
        "ejected_until_in_s": 6.0,
        "times_ejected": 1,
        "ttfb_ewma_ms": 250.0,
        "samples": 1,
        "weight_factor": 1.0,
    }
    assert det.snapshot("a", 110.0)["ejected"] is False
