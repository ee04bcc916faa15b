"""The per-backend circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest

from llmproxy.config.schema import BreakerConfig
from llmproxy.resilience.breaker import Breaker, BreakerState

from .fakes import FakeClock

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class Transitions:
    """Records ``on_transition`` calls, and the state the breaker reported then."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, BreakerState, BreakerState]] = []
        self.breaker: Breaker | None = None
        self.state_seen: list[BreakerState] = []

    def __call__(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.calls.append((name, old, new))
        if self.breaker is not None:
            self.state_seen.append(self.breaker.state)

    @property
    def pairs(self) -> list[tuple[BreakerState, BreakerState]]:
        return [(old, new) for _, old, new in self.calls]


def make(
    threshold: int = 3, reset_s: float = 10.0, probes: int = 1
) -> tuple[Breaker, FakeClock, Transitions]:
    clock = FakeClock(100.0)
    seen = Transitions()
    cfg = BreakerConfig(
        failure_threshold=threshold, reset_timeout_s=reset_s, half_open_max_calls=probes
    )
    breaker = Breaker("pool/b1", cfg, clock, seen)
    seen.breaker = breaker
    return breaker, clock, seen


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        assert breaker.acquire()
        breaker.record_failure()


def test_state_values_and_gauges() -> None:
    assert [s.value for s in (CLOSED, HALF_OPEN, OPEN)] == ["closed", "half_open", "open"]
    assert [s.gauge for s in (CLOSED, HALF_OPEN, OPEN)] == [0, 1, 2]


def test_opens_after_threshold_consecutive_failures() -> None:
    b, _, seen = make(threshold=3)
    fail(b, 2)
    assert b.state is CLOSED
    assert b.snapshot()["fail_counter"] == 2
    assert b.admits()
    fail(b, 1)
    assert b.state is OPEN
    assert not b.admits()
    assert not b.acquire()
    assert seen.pairs == [(CLOSED, OPEN)]


def test_success_resets_failure_count() -> None:
    b, _, _ = make(threshold=3)
    fail(b, 2)
    assert b.acquire()
    b.record_success()
    assert b.snapshot()["fail_counter"] == 0
    fail(b, 2)
    assert b.state is CLOSED
    fail(b, 1)
    assert b.state is OPEN


def test_open_refuses_until_reset_timeout() -> None:
    b, clock, _ = make(reset_s=10.0)
    fail(b, 3)
    clock.advance(9.75)
    assert not b.admits()
    assert not b.acquire()
    assert b.state is OPEN
    assert b.snapshot()["opened_for_s"] == 9.75
    clock.advance(0.25)
    assert b.admits()
    assert b.state is OPEN  # admits() moved nothing
    assert b.acquire()
    assert b.state is HALF_OPEN


@pytest.mark.parametrize("probes", [1, 2, 5])
def test_half_open_admits_at_most_max_calls(probes: int) -> None:
    b, clock, _ = make(probes=probes)
    fail(b, 3)
    clock.advance(10.0)
    assert [b.acquire() for _ in range(probes + 1)] == [True] * probes + [False]
    assert not b.admits()
    assert b.snapshot()["probes_in_flight"] == probes


def test_half_open_success_closes() -> None:
    b, clock, seen = make()
    fail(b, 3)
    clock.advance(10.0)
    assert b.acquire()
    b.record_success()
    assert b.state is CLOSED
    snap = b.snapshot()
    assert snap["fail_counter"] == 0
    assert snap["opened_for_s"] is None
    assert snap["probes_in_flight"] == 0
    assert seen.pairs == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_half_open_failure_reopens_and_restarts_timer() -> None:
    b, clock, _ = make(reset_s=10.0)
    fail(b, 3)
    clock.advance(10.0)
    assert b.acquire()
    clock.advance(2.0)
    b.record_failure()
    assert b.state is OPEN
    assert b.snapshot()["opened_for_s"] == 0.0
    clock.advance(9.5)  # 21.5 s after the first opening, 9.5 s after the second
    assert not b.admits()
    assert not b.acquire()
    clock.advance(0.5)
    assert b.acquire()
    assert b.state is HALF_OPEN


def test_a_failed_probe_frees_its_slot_for_the_next_half_open() -> None:
    b, clock, _ = make(probes=1)
    fail(b, 3)
    clock.advance(10.0)
    assert b.acquire()
    b.record_failure()
    clock.advance(10.0)
    assert b.acquire()


def test_release_frees_slot_without_verdict() -> None:
    b, clock, seen = make(probes=1)
    fail(b, 3)
    clock.advance(10.0)
    assert b.acquire()
    assert not b.acquire()
    b.release()
    assert b.state is HALF_OPEN
    assert b.snapshot()["fail_counter"] == 3
    assert b.admits()
    assert b.acquire()
    assert seen.pairs == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_release_in_closed_counts_nothing() -> None:
    b, _, _ = make(threshold=3)
    fail(b, 2)
    assert b.acquire()
    b.release()
    assert b.snapshot()["fail_counter"] == 2
    assert b.snapshot()["in_flight"] == 0


def test_on_transition_once_per_transition_with_states() -> None:
    b, clock, seen = make(threshold=2, reset_s=5.0)
    fail(b, 2)  # closed -> open
    clock.advance(5.0)
    assert b.acquire()  # open -> half_open
    b.record_failure()  # half_open -> open
    clock.advance(5.0)
    assert b.acquire()  # open -> half_open
    b.record_success()  # half_open -> closed
    fail(b, 1)
    b.acquire()
    b.record_success()
    assert seen.calls == [
        ("pool/b1", CLOSED, OPEN),
        ("pool/b1", OPEN, HALF_OPEN),
        ("pool/b1", HALF_OPEN, OPEN),
        ("pool/b1", OPEN, HALF_OPEN),
        ("pool/b1", HALF_OPEN, CLOSED),
    ]
    # The callback already sees the new state.
    assert seen.state_seen == [new for _, new in seen.pairs]


def test_admits_has_no_side_effects() -> None:
    b, clock, seen = make(probes=2)
    fail(b, 3)
    clock.advance(60.0)
    before = (b.state, b.snapshot(), list(seen.calls))
    for _ in range(10):
        assert b.admits()
    assert (b.state, b.snapshot(), list(seen.calls)) == before


def test_calls_sent_while_closed_count_against_the_probe_limit() -> None:
    """A long stream sent before the breaker opened is still out to the
    backend; the probe limit covers it, and its verdict counts."""
    b, clock, seen = make(threshold=3, probes=2)
    assert b.acquire()  # a long stream, still running
    fail(b, 3)
    clock.advance(10.0)
    assert b.admits()
    assert b.acquire()  # open -> half_open; two calls out now
    assert not b.admits()
    assert not b.acquire()
    b.record_success()  # the long stream ends well: the backend works
    assert b.state is CLOSED
    assert seen.pairs[-1] == (HALF_OPEN, CLOSED)


def test_verdicts_of_calls_sent_before_opening() -> None:
    b, clock, seen = make(threshold=3, reset_s=10.0, probes=1)
    for _ in range(3):
        assert b.acquire()  # three long streams
    fail(b, 3)
    assert b.state is OPEN
    clock.advance(5.0)
    b.record_failure()  # adds nothing, and does not restart the timer
    b.record_success()  # before the reset timeout: no effect
    assert b.state is OPEN
    assert seen.pairs == [(CLOSED, OPEN)]
    clock.advance(5.0)
    assert not b.admits()  # the third stream is still out: the probe limit holds
    b.record_success()  # after the reset timeout: proof the backend serves
    assert b.state is CLOSED
    assert seen.pairs == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_unmatched_verdicts_never_drive_in_flight_negative() -> None:
    b, _, _ = make()
    b.release()
    b.record_success()
    assert b.snapshot()["in_flight"] == 0
    assert b.acquire()
    assert b.snapshot()["in_flight"] == 1


def test_snapshot_shape() -> None:
    b, clock, _ = make()
    assert b.snapshot() == {
        "state": "closed",
        "fail_counter": 0,
        "in_flight": 0,
        "probes_in_flight": 0,
        "opened_for_s": None,
    }
    fail(b, 3)
    clock.advance(4.0)
    assert b.snapshot() == {
        "state": "open",
        "fail_counter": 3,
        "in_flight": 0,
        "probes_in_flight": 0,
        "opened_for_s": 4.0,
    }
