"""Hand-written test doubles for the resilience unit tests."""

from __future__ import annotations

import random


class FakeClock:
    """Monotonic seconds that move only when a test calls ``advance``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSleep:
    """An ``asyncio.sleep`` stand-in that records the waits and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(float(seconds))


class MaxRandom(random.Random):
    """A Random whose ``uniform(a, b)`` is always ``b``: jitter at its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b
