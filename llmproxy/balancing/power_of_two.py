"""Power of two choices: sample two distinct backends, keep the less loaded.

Both samples are weighted by ``effective_weight`` (the second among the
remaining candidates), and the one with the lower ``in_flight / weight`` wins;
on a tie the first sample wins, so an idle pool is served in proportion to
weight. The most loaded backend of a pool of three or more is never chosen
while its load per weight is strictly above the others', since it always
loses its comparison. Costs two ``rng.random()`` draws (one with two
candidates, none with one) and two O(n) scans.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmproxy.balancing.base import B, NoCandidatesError, PickContext
from llmproxy.balancing.random_choice import weighted_index


class PowerOfTwoBalancer:
    """Weighted power-of-two-choices over ``in_flight / effective_weight``."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        n = len(candidates)
        if n == 0:
            raise NoCandidatesError("power_of_two: no eligible backend to pick from")
        if n == 1:
            return candidates[0]
        total = 0.0
        for c in candidates:
            total += c.effective_weight
        rng = self._rng
        i = weighted_index(candidates, rng.random() * total)
        a = candidates[i]
        if n == 2:
            b = candidates[1 - i]
        else:
            rest = total - a.effective_weight
            b = candidates[weighted_index(candidates, rng.random() * rest, skip=i)]
        # Compare in_flight/weight without dividing: a_if/a_w > b_if/b_w.
        if a.in_flight * b.effective_weight > b.in_flight * a.effective_weight:
            return b
        return a
