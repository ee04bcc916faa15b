"""nginx's smooth weighted round-robin.

On every pick each candidate's *current weight* grows by its effective weight;
the candidate with the largest current weight wins and loses the total of all
effective weights. Over any window of ``sum(weights)`` picks (integer weights,
unchanged set) each backend is chosen exactly ``weight`` times, and the picks
are interleaved (5, 1, 1 gives ``a a b a c a a``) rather than bunched.

State is one float per backend name. A backend that joins starts at 0; one
that leaves is forgotten, so if it returns it starts at 0 again. Invariant
while the set and weights are unchanged: the current weights sum to 0 (up to
float rounding). Candidate names must be unique within one call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from llmproxy.balancing.base import B, NoCandidatesError, PickContext


class WeightedRoundRobinBalancer:
    """Smooth WRR over ``effective_weight`` (floats allowed, > 0)."""

    __slots__ = ("_current",)

    def __init__(self, rng: random.Random) -> None:
        # Deterministic strategy: the rng is accepted only for the factory signature.
        del rng
        self._current: dict[str, float] = {}

    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        if not candidates:
            raise NoCandidatesError("weighted_round_robin: no eligible backend to pick from")
        current = self._current
        total = 0.0
        best = candidates[0]
        best_cw = -math.inf
        for c in candidates:
            w = c.effective_weight
            cw = current.get(c.name, 0.0) + w
            current[c.name] = cw
            total += w
            # Strict ">" keeps nginx's tie rule: the first of the equals wins.
            if cw > best_cw:
                best, best_cw = c, cw
        current[best.name] = best_cw - total
        if len(current) > len(candidates):
            # Some backend left since the last call (rare): drop its state.
            self._prune(candidates)
        return best

    def _prune(self, candidates: Sequence[B]) -> None:
        live = {c.name for c in candidates}
        for name in [n for n in self._current if n not in live]:
            del self._current[name]
