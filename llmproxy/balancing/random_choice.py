"""Weighted random choice.

:func:`weighted_index` is the linear cumulative-weight scan shared with
``power_of_two``. A scan is O(n) with no allocation, which for pools of at
most ~100 backends is cheaper than keeping a cumulative table in sync with
weights that change at run time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmproxy.balancing.base import B, BackendView, NoCandidatesError, PickContext


def weighted_index(candidates: Sequence[BackendView], point: float, skip: int = -1) -> int:
    """Index of the candidate whose cumulative-weight interval contains ``point``.

    ``point`` is in ``[0, total)``, where ``total`` is the sum of the effective
    weights of all candidates except the one at ``skip`` (``-1``: none skipped).
    If float rounding pushes ``point`` past the last interval, the last
    non-skipped candidate is returned; ``candidates`` must hold at least one
    non-skipped element.
    """
    cum = 0.0
    last = -1
    for i, c in enumerate(candidates):
        if i == skip:
            continue
        cum += c.effective_weight
        if point < cum:
            return i
        last = i
    return last


class RandomBalancer:
    """Each request goes to a backend with probability ``weight / sum(weights)``."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        n = len(candidates)
        if n == 0:
            raise NoCandidatesError("random: no eligible backend to pick from")
        if n == 1:
            return candidates[0]
        total = 0.0
        for c in candidates:
            total += c.effective_weight
        return candidates[weighted_index(candidates, self._rng.random() * total)]
