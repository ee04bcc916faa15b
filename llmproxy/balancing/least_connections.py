"""Least connections, weighted: minimise ``in_flight / effective_weight``.

Ties are broken by weighted random choice among the tied candidates (a
one-pass weighted reservoir sample), so an idle pool, where every score is 0,
spreads requests in proportion to weight instead of always hitting the first
backend. :func:`least_loaded` is shared with ``consistent_hash``'s fallback.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmproxy.balancing.base import B, NoCandidatesError, PickContext


def least_loaded(candidates: Sequence[B], rng: random.Random) -> B:
    """The candidate with the lowest in-flight count per unit weight.

    ``candidates`` must not be empty. Among tied candidates, each is returned
    with probability ``weight / sum(tied weights)``; one ``rng.random()`` is
    drawn per tie encountered, none when there is no tie.
    """
    it = iter(candidates)
    best = next(it)
    tied_weight = best.effective_weight
    best_score = best.in_flight / tied_weight
    for c in it:
        w = c.effective_weight
        score = c.in_flight / w
        if score < best_score:
            best, best_score, tied_weight = c, score, w
        elif score == best_score:
            # Chao's reservoir step: keep the newcomer with probability w / (tied so far).
            tied_weight += w
            if rng.random() * tied_weight < w:
                best = c
    return best


class LeastConnectionsBalancer:
    """Sends each request to the backend with the least in-flight work per weight."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        if not candidates:
            raise NoCandidatesError("least_connections: no eligible backend to pick from")
        return least_loaded(candidates, self._rng)
