"""Plain round-robin: each candidate in turn, weights ignored.

The cursor is kept modulo the current number of candidates, so a set that
shrinks or grows between calls only shifts the rotation; it never indexes out
of range. Invariant between calls: ``0 <= self._next <= len(last candidates)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmproxy.balancing.base import B, NoCandidatesError, PickContext


class RoundRobinBalancer:
    """Cycles through the candidates in the order the caller gives them."""

    __slots__ = ("_next",)

    def __init__(self, rng: random.Random) -> None:
        # The rng is accepted for the common factory signature; rotation needs none.
        del rng
        self._next = 0

    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        n = len(candidates)
        if n == 0:
            raise NoCandidatesError("round_robin: no eligible backend to pick from")
        i = self._next % n
        self._next = i + 1
        return candidates[i]
