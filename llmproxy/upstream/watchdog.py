"""One timer per request for the first-byte, idle and total timeouts.

A stream relays thousands of chunks; arming a fresh timer per chunk (as
``asyncio.timeout`` or aiohttp's ``sock_read`` do) costs a heap operation
each time. The watchdog instead records when progress was last made (one
``loop.time()`` per chunk) and keeps a single ``TimerHandle`` that, when it
fires, either re-arms itself for the new deadline or cancels the task.
"""

from __future__ import annotations

import asyncio
import enum


class Expiry(enum.Enum):
    FIRST_BYTE = "first_byte"
    IDLE = "idle"
    TOTAL = "total"


class Watchdog:
    __slots__ = (
        "_first_byte_s",
        "_handle",
        "_idle_s",
        "_loop",
        "_task",
        "_total_deadline",
        "expired",
        "last",
        "started",
    )

    def __init__(self, first_byte_s: float, idle_s: float, total_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "Watchdog must be created inside a task"
        self._task = task
        self._first_byte_s = first_byte_s
        self._idle_s = idle_s
        self.started = self._loop.time()
        self._total_deadline = self.started + total_s
        #: ``None`` until the first byte; then when the last chunk was relayed.
        self.last: float | None = None
        self.expired: Expiry | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._arm(min(self.started + first_byte_s, self._total_deadline))

    def _arm(self, when: float) -> None:
        self._handle = self._loop.call_at(when, self._fire)

    def restart_first_byte(self) -> None:
        """A new attempt begins: its first-byte clock starts now."""
        if self._handle is not None:
            self._handle.cancel()
        self._arm(min(self._loop.time() + self._first_byte_s, self._total_deadline))

    def _fire(self) -> None:
        now = self._loop.time()
        if now >= self._total_deadline:
            self._expire(Expiry.TOTAL)
        elif self.last is None:
            self._expire(Expiry.FIRST_BYTE)
        elif now - self.last >= self._idle_s:
            self._expire(Expiry.IDLE)
        else:
            self._arm(min(self.last + self._idle_s, self._total_deadline))

    def _expire(self, why: Expiry) -> None:
        self._handle = None
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
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
