"""The first-byte, idle and total timeouts of a request, on shared timers.

A stream relays thousands of chunks; arming a fresh timer per chunk (as
``asyncio.timeout`` or aiohttp's ``sock_read`` do) costs a heap operation
each time. The watchdog instead records when progress was last made (one
``loop.time()`` per chunk) and is woken only at its deadline, when it either
waits again for the new deadline or cancels the task.

Deadlines are coalesced (as nginx and Envoy coalesce connection timers):
each is rounded up to a slot of the coarsest grid of :data:`GRIDS_MS` no
wider than a tenth of its distance (1 s for a deadline 10 s or more away,
100 ms from 1 s, else 10 ms),
and the watchdogs due in one slot share a single loop timer
(:class:`Timers`). A slot that empties keeps its timer until it fires (a
no-op) rather than cancelling it: under steady traffic a request then costs a
set insertion and removal, not a ``call_at`` and a ``cancel`` (about 2 µs on
uvloop), and an open stream holds a set entry, not a ``TimerHandle`` (about
0.5 KB). A timeout fires at most 10% late (10 ms for short ones).
"""

from __future__ import annotations

import asyncio
import enum
import math

#: Slot widths in milliseconds, coarsest first: a deadline uses the first
#: that is at most a tenth of its distance, else the last.
GRIDS_MS = (1000, 100, 10)


class Expiry(enum.Enum):
    FIRST_BYTE = "first_byte"
    IDLE = "idle"
    TOTAL = "total"


class Timers:
    """Deadlines rounded up to a slot; one loop timer per slot that has any."""

    __slots__ = ("_slots", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, set[Watchdog]] = {}

    def add(self, wd: Watchdog, when: float) -> int:
        """Wake ``wd`` at ``when`` (up to one slot later); returns its slot."""
        ahead_ms = (when - self.loop.time()) * 1000
        for grid in GRIDS_MS:
            if ahead_ms >= 10 * grid:
                break
        # The slot's end, in whole milliseconds: grids that meet share it.
        key = -(-math.ceil(when * 1000) // grid) * grid
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            self.loop.call_at(key / 1000, self._fire, key)
        slot.add(wd)
        return key

    def remove(self, wd: Watchdog, key: int) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(wd)  # an empty slot waits for its timer: cheaper than cancelling

    def __len__(self) -> int:
        """Watchdogs waiting."""
        return sum(len(s) for s in self._slots.values())

    def pending_slots(self) -> int:
        """Slots with a timer (some perhaps empty)."""
        return len(self._slots)

    def _fire(self, key: int) -> None:
        for wd in self._slots.pop(key):
            if wd._slot == key:  # not stopped meanwhile by another's wake-up
                wd._wake()


class Watchdog:
    __slots__ = (
        "_first_byte_s",
        "_idle_s",
        "_loop",
        "_slot",
        "_task",
        "_timers",
        "_total_deadline",
        "expired",
        "last",
        "started",
    )

    def __init__(
        self,
        timers: Timers,
        task: asyncio.Task[object],
        first_byte_s: float,
        idle_s: float,
        total_s: float,
    ) -> None:
        self._timers = timers
        self._loop = loop = timers.loop
        self._task = task
        self._first_byte_s = first_byte_s
        self._idle_s = idle_s
        self.started = loop.time()
        self._total_deadline = self.started + total_s
        #: ``None`` until the first byte; then when the last chunk was relayed.
        self.last: float | None = None
        self.expired: Expiry | None = None
        first = min(self.started + first_byte_s, self._total_deadline)
        self._slot: int | None = timers.add(self, first)

    def _wake(self) -> None:
        self._slot = None
        now = self._loop.time()
        if now >= self._total_deadline:
            self._expire(Expiry.TOTAL)
        elif self.last is None:
            self._expire(Expiry.FIRST_BYTE)
        elif now - self.last >= self._idle_s:
            self._expire(Expiry.IDLE)
        else:
            self._slot = self._timers.add(self, min(self.last + self._idle_s, self._total_deadline))

    def _expire(self, why: Expiry) -> None:
        self.expired = why
        self._task.cancel()

    def absorb(self) -> bool:
        """Call on ``CancelledError``: True if the watchdog caused it (it is
        then un-cancelled and the caller handles a timeout), False if someone
        else cancelled the task (the client left, shutdown) and it must go on.
        """
        if self.expired is None:
            return False
        self._task.uncancel()
        return True

    def stop(self) -> None:
        if self._slot is not None:
            self._timers.remove(self, self._slot)
            self._slot = None
