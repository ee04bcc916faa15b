"""A FIFO concurrency cap that can say how many requests run and how many wait.

It plays the part of vLLM's scheduler limit (``max_num_seqs``): at most
``limit`` requests generate at once, the others queue in arrival order.
``asyncio.Semaphore`` does not expose its queue length, which the replica
reports as ``vllm:num_requests_waiting``; hence this small class.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ConcurrencyGate:
    """``limit`` slots handed over in FIFO order; ``limit <= 0`` means no cap.

    A released slot goes straight to the oldest waiter (``running`` does not
    drop in between), so a newcomer can never overtake the queue.
    """

    __slots__ = ("_limit", "_waiters", "running")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.running = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _has_room(self) -> bool:
        return self._limit <= 0 or self.running < self._limit

    async def acquire(self) -> None:
        if not self._waiters and self._has_room():
            self.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just before the cancellation: pass it on.
                self.release()
            elif waiter in self._waiters:  # release() may have dropped it already
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.running -= 1
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
