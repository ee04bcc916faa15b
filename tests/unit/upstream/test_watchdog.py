"""The watchdog's timeouts on coalesced timers, with a fake loop and clock."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from llmproxy.upstream.watchdog import Expiry, Timers, Watchdog


class _Handle:
    def __init__(self, loop: _FakeLoop, when: float, callback: Any, args: tuple[Any, ...]) -> None:
        self.loop, self.when, self.callback, self.args = loop, when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _FakeLoop:
    """time() and call_at(), nothing else: timers run only when advanced."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.handles: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any) -> _Handle:
        h = _Handle(self, when, callback, args)
        self.handles.append(h)
        return h

    def pending(self) -> list[_Handle]:
        return [h for h in self.handles if not h.cancelled]

    def advance(self, to: float) -> None:
        """Run every live timer due by ``to``, in order (like a loop would)."""
        while True:
            due = sorted((h for h in self.pending() if h.when <= to), key=lambda h: h.when)
            if not due:
                break
            h = due[0]
            self.handles.remove(h)
            self.now = max(self.now, h.when)
            h.callback(*h.args)
        self.now = to


class _FakeTask:
    def __init__(self) -> None:
        self.cancels = 0

    def cancel(self) -> bool:
        self.cancels += 1
        return True

    def uncancel(self) -> int:
        self.cancels -= 1
        return self.cancels


def _make(
    loop: _FakeLoop, first_byte_s: float = 5, idle_s: float = 2, total_s: float = 60
) -> tuple[Timers, Watchdog, _FakeTask]:
    timers = Timers(cast(asyncio.AbstractEventLoop, loop))
    task = _FakeTask()
    wd = Watchdog(timers, cast("asyncio.Task[object]", task), first_byte_s, idle_s, total_s)
    return timers, wd, task


def test_no_first_byte_expires_within_a_tenth_of_the_timeout() -> None:
    loop = _FakeLoop()
    _, wd, task = _make(loop, first_byte_s=5)
    loop.advance(1004.999)
    assert task.cancels == 0
    loop.advance(1005.1)  # 5 s away: a 100 ms slot
    assert (task.cancels, wd.expired) == (1, Expiry.FIRST_BYTE)
    assert wd.absorb()
    assert task.cancels == 0


@pytest.mark.parametrize(
    ("ahead_s", "late_at_most_s"), [(0.05, 0.01), (0.5, 0.01), (3, 0.1), (60, 1), (3600, 1)]
)
def test_a_deadline_fires_late_by_at_most_its_slot(ahead_s: float, late_at_most_s: float) -> None:
    loop = _FakeLoop()
    for start in (1000.0, 1000.0004, 1000.0123, 1000.5):
        loop.now = start
        _, wd, task = _make(loop, first_byte_s=ahead_s, total_s=7200)
        (handle,) = [h for h in loop.pending() if h.callback.__self__ is wd._timers]
        assert start + ahead_s <= handle.when <= start + ahead_s + late_at_most_s + 1e-9
        loop.advance(handle.when)
        assert task.cancels == 1


def test_progress_defers_the_idle_timeout() -> None:
    loop = _FakeLoop()
    timers, wd, task = _make(loop, first_byte_s=5, idle_s=2)
    loop.advance(1004.5)
    wd.last = loop.now  # the first byte
    loop.advance(1005.5)  # the first-byte deadline passes: the watchdog waits again
    assert task.cancels == 0
    assert len(timers) == 1
    loop.advance(1006)
    wd.last = loop.now  # another chunk
    loop.advance(1007.9)
    assert task.cancels == 0
    loop.advance(1008.1)
    assert wd.expired is Expiry.IDLE
    assert task.cancels == 1
    assert len(timers) == 0
    assert timers.pending_slots() == 0
    assert loop.pending() == []


def test_total_deadline_wins_over_progress() -> None:
    loop = _FakeLoop()
    _, wd, task = _make(loop, first_byte_s=5, idle_s=2, total_s=7)
    for t in range(1001, 1008):
        loop.advance(t - 0.5)
        wd.last = loop.now
    loop.advance(1007.1)
    assert wd.expired is Expiry.TOTAL
    assert task.cancels == 1


def test_requests_share_slot_timers_and_stopped_ones_never_fire() -> None:
    loop = _FakeLoop()
    timers = Timers(cast(asyncio.AbstractEventLoop, loop))
    tasks = [_FakeTask() for _ in range(500)]
    dogs = []
    for i, task in enumerate(tasks):
        loop.now = 1000 + i * 0.002  # 500 requests in one second, 60 s first-byte timeout
        dogs.append(Watchdog(timers, cast("asyncio.Task[object]", task), 60, 2, 600))
    assert len(timers) == 500
    assert len(loop.pending()) <= 2  # one timer per 1 s slot, not one per request
    for wd in dogs[:499]:
        wd.stop()
        wd.stop()  # idempotent
    assert len(timers) == 1
    loop.advance(1100)
    # Only the one still waiting expired; the slots' timers fired and are gone.
    assert [t.cancels for t in tasks] == [0] * 499 + [1]
    assert timers.pending_slots() == 0
    assert loop.pending() == []


def test_steady_traffic_keeps_a_bounded_number_of_slots() -> None:
    loop = _FakeLoop()
    timers = Timers(cast(asyncio.AbstractEventLoop, loop))
    task = cast("asyncio.Task[object]", _FakeTask())
    for _ in range(20_000):  # one request at a time, 2 ms each, for 40 s
        wd = Watchdog(timers, task, 60, 60, 3600)
        loop.advance(loop.now + 0.002)
        wd.stop()
    # A timer per second of the 60 s first-byte window, not one per request.
    assert timers.pending_slots() <= 61
    assert len(loop.handles) <= 61
