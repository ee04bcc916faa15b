"""A circuit breaker per backend: pybreaker's state machine, a probe limit,
and an injected clock.

pybreaker counts failures and makes the transitions; this adapter adds what
a proxy needs around it:

* **A probe limit.** pybreaker's half-open state lets every concurrent call
  through, so a replica that has just come back gets the whole pool's traffic
  at once (FIELD-NOTES 13). Here at most ``half_open_max_calls`` calls are out
  to the backend while the breaker is not closed.
* **An injected clock** (monotonic seconds). pybreaker stamps ``opened_at``
  with ``datetime.now(UTC)``; :class:`_ClockStorage` keeps the injected
  clock's reading instead, so the reset timeout is exact in tests.
* **A cheap ``admits()``** for candidate filtering on the hot path.

Contract with the caller: every ``acquire()`` that returned True is matched by
exactly one of ``record_success()``, ``record_failure()`` or ``release()``.
The adapter counts calls in flight in every state, so the probe limit holds
for calls that were sent while the breaker was still closed (a long stream
finishing during half-open is a probe too, and its verdict counts). A verdict
without a matching ``acquire()`` still counts; the in-flight count never goes
below zero.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypedDict

import pybreaker

from llmproxy.config.schema import BreakerConfig


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """The ``llmproxy_breaker_state`` value: closed 0, half-open 1, open 2."""
        return _GAUGE[self]


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_FROM_PYBREAKER = {
    pybreaker.STATE_CLOSED: BreakerState.CLOSED,
    pybreaker.STATE_HALF_OPEN: BreakerState.HALF_OPEN,
    pybreaker.STATE_OPEN: BreakerState.OPEN,
}
#: Margin around the wall-clock date handed to pybreaker, so that wall-clock
#: reads between ours and pybreaker's cannot flip its timeout comparison.
_SLACK = timedelta(days=1)


class BreakerSnapshot(TypedDict):
    state: str
    fail_counter: int
    #: Calls out to the backend; all of them are probes unless closed.
    in_flight: int
    probes_in_flight: int
    #: Seconds since the breaker last opened; None while closed.
    opened_for_s: float | None


class _Failure(Exception):
    """Raised inside ``calling()`` so that pybreaker counts a failure."""


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage, with ``opened_at`` on the injected clock.

    pybreaker sets ``opened_at`` when it opens and reads it only to test
    ``datetime.now(UTC) < opened_at + reset_timeout``. The setter ignores the
    wall-clock date and keeps the injected clock's reading (``opened_mono``);
    the getter answers with a date that makes that test come out as the
    injected clock says.
    """

    def __init__(self, clock: Callable[[], float], reset_timeout_s: float) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock
        self._reset_timeout_s = reset_timeout_s
        #: Injected-clock time of the last opening; None if never opened.
        self.opened_mono: float | None = None

    def elapsed(self) -> bool:
        """Whether the reset timeout has passed since the last opening."""
        if self.opened_mono is None:
            return True
        return self._clock() - self.opened_mono >= self._reset_timeout_s

    @property
    def opened_at(self) -> datetime | None:
        if self.opened_mono is None:
            return None
        wall_now = datetime.now(UTC)
        if self.elapsed():
            return wall_now - timedelta(seconds=self._reset_timeout_s) - _SLACK
        return wall_now + _SLACK

    @opened_at.setter
    def opened_at(self, _wall: datetime) -> None:
        self.opened_mono = self._clock()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[BreakerState, BreakerState], None]) -> None:
        self._on_change = on_change

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if old_state is None or old_state.name == new_state.name:
            return
        self._on_change(_FROM_PYBREAKER[old_state.name], _FROM_PYBREAKER[new_state.name])


class Breaker:
    """One backend's breaker. Not thread-safe: use it from the event loop."""

    def __init__(
        self,
        name: str,
        cfg: BreakerConfig,
        clock: Callable[[], float],
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        """``on_transition(name, old, new)`` runs once per state change, after
        ``state`` already reports ``new``; it must not raise."""
        self.name = name
        self._clock = clock
        self._max_probes = max(1, cfg.half_open_max_calls)
        self._on_transition = on_transition
        self._storage = _ClockStorage(clock, cfg.reset_timeout_s)
        #: Mirror of pybreaker's state, kept by the listener: a plain
        #: attribute read is all the closed-state hot path costs.
        self._state = BreakerState.CLOSED
        self._in_flight = 0
        self._cb = pybreaker.CircuitBreaker(
            fail_max=cfg.failure_threshold,
            reset_timeout=cfg.reset_timeout_s,
            state_storage=self._storage,
            listeners=[_Listener(self._changed)],
            name=name,
        )

    def _changed(self, old: BreakerState, new: BreakerState) -> None:
        self._state = new
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)

    @property
    def state(self) -> BreakerState:
        """pybreaker's state. An OPEN breaker whose reset timeout has passed
        stays OPEN until ``acquire()`` sends a probe; ``admits()`` tells."""
        return self._state

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admits(self) -> bool:
        """Whether ``acquire()`` would succeed now; changes nothing."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._in_flight >= self._max_probes:
            return False
        return self._state is BreakerState.HALF_OPEN or self._storage.elapsed()

    def acquire(self) -> bool:
        """Take a permit for a call about to be sent; False refuses it.

        An open breaker whose reset timeout has passed goes half-open here
        (through pybreaker), and this call is its first probe.
        """
        if self._state is not BreakerState.CLOSED:
            if self._in_flight >= self._max_probes:
                return False
            if self._state is BreakerState.OPEN:
                if not self._storage.elapsed():
                    return False
                self._cb.half_open()
        self._in_flight += 1
        return True

    def record_success(self) -> None:
        """The call succeeded: closed keeps the count at zero, half-open
        closes. While open, pybreaker decides: before the reset timeout it
        counts nothing; after it, the backend has just served a call (one
        sent before the breaker opened), which closes the breaker by way of
        half-open."""
        self._free()
        if self._state is BreakerState.CLOSED and self._cb.fail_counter == 0:
            return  # pybreaker would reset a count that is already zero: skip it
        try:
            with self._cb.calling():
                pass
        except pybreaker.CircuitBreakerError:
            pass  # open, timeout not elapsed: nothing counted

    def record_failure(self) -> None:
        """The call failed: counts towards ``failure_threshold`` when closed,
        reopens (restarting the reset timeout) when half-open. While open it
        counts nothing: that call was sent before the breaker opened."""
        self._free()
        if self._state is BreakerState.OPEN:
            return
        try:
            with self._cb.calling():
                raise _Failure
        except (_Failure, pybreaker.CircuitBreakerError):
            pass  # counted by pybreaker; the error is the caller's to report

    def release(self) -> None:
        """The call ended with no verdict on the backend (client cancelled,
        client's own 4xx): frees its permit, counts nothing."""
        self._free()

    def _free(self) -> None:
        if self._in_flight > 0:
            self._in_flight -= 1

    def snapshot(self) -> BreakerSnapshot:
        """For the admin API."""
        state = self._state
        opened = self._storage.opened_mono
        return {
            "state": state.value,
            "fail_counter": self._cb.fail_counter,
            "in_flight": self._in_flight,
            "probes_in_flight": 0 if state is BreakerState.CLOSED else self._in_flight,
            "opened_for_s": (
                None if state is BreakerState.CLOSED or opened is None else self._clock() - opened
            ),
        }
