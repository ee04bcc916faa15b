"""Hand-written test doubles for the balancers."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class FakeBackend:
    """A mutable BackendView: tests set ``in_flight`` and ``effective_weight`` directly."""

    name: str
    effective_weight: float = 1.0
    in_flight: int = 0


def backends(*weights: float, prefix: str = "b") -> list[FakeBackend]:
    return [FakeBackend(f"{prefix}{i}", w) for i, w in enumerate(weights)]


class CountingRandom(random.Random):
    """A seeded Random that counts ``random()`` draws, to check a path draws none."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()
