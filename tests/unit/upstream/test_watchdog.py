"""The watchdog's timeouts on coalesced timers, with a fake loop and clock."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from llmproxy.upstream.watchdog import RESOLUTION_S, Expiry, Timers, Watchdog


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


def test_no_first_byte_expires_within_one_slot() -> None:
    loop = _FakeLoop()
    _, wd, task = _make(loop, first_byte_s=5)
    loop.advance(1004.999)
    assert task.cancels == 0
    loop.advance(1005 + RESOLUTION_S)
    assert (task.cancels, wd.expired) == (1, Expiry.FIRST_BYTE)
    assert wd.absorb()
    assert task.cancels == 0


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
    loop.advance(1008 + RESOLUTION_S)
    assert wd.expired is Expiry.IDLE
    assert task.cancels == 1
    assert len(timers) == 0
    assert loop.pending() == []


def test_total_deadline_wins_over_progress() -> None:
    loop = _FakeLoop()
    _, wd, task = _make(loop, first_byte_s=5, idle_s=2, total_s=7)
    for t in range(1001, 1008):
        loop.advance(t - 0.5)
        wd.last = loop.now
    loop.advance(1007 + RESOLUTION_S)
    assert wd.expired is Expiry.TOTAL
    assert task.cancels == 1


def test_watchdogs_in_one_slot_share_one_timer() -> None:
    loop = _FakeLoop()
    timers = Timers(cast(asyncio.AbstractEventLoop, loop))
    tasks = [_FakeTask() for _ in range(50)]
    dogs = []
    for i, task in enumerate(tasks):
        loop.now = 1000 + i * RESOLUTION_S / 100  # 50 requests inside one slot
        dogs.append(Watchdog(timers, cast("asyncio.Task[object]", task), 5, 2, 60))
    assert len(timers) == 50
    assert len(loop.pending()) <= 2
    for wd in dogs[:49]:
        wd.stop()
    assert len(timers) == 1
    assert len(loop.pending()) == 1
    dogs[49].stop()
    # The last one out cancels the shared timer: nothing fires, nothing is held.
    assert len(timers) == 0
    assert loop.pending() == []
    loop.advance(1100)
    assert all(t.cancels == 0 for t in tasks)


def test_stop_is_idempotent_and_a_stopped_watchdog_never_fires() -> None:
    loop = _FakeLoop()
    timers, wd, task = _make(loop)
    other_task = _FakeTask()
    Watchdog(timers, cast("asyncio.Task[object]", other_task), 5, 2, 60)
    wd.stop()
    wd.stop()
    loop.advance(1100)
    assert task.cancels == 0
    assert not wd.absorb()
    assert other_task.cancels == 1
