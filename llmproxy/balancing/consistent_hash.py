"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016).

Ring. Each backend owns ``round(vnodes_per_weight * effective_weight)`` points
(at least one) on a 64-bit ring. Its points are the successive 8-byte words of
``shake_128(name)``, so they depend on nothing but its name, the first ``k``
are the same whatever ``k`` is, and every proxy process builds the same ring.
A key's position is ``blake2b(key)`` (64 bits, never Python's ``hash()``).

Bounded load. A key goes to the owner of the first point clockwise from its
position whose in-flight count is below its capacity

    capacity = ceil(load_factor * (total_in_flight + 1) * weight / total_weight)

where the totals are over the current candidates and ``+ 1`` is the request
being placed. With ``load_factor >= 1`` the capacities sum to more than the
total in flight, so some backend is below capacity and the walk ends within
one lap. Without load, the same key and set give the same backend every time,
and removing a backend moves only the keys it held.

Balance and cost. A ring's static imbalance is about ``1 / sqrt(points per
backend)`` relative: with the default 512 points per unit weight, a backend's
share of keys is within a few percent of its weight's share, and bounded load
caps the rest at run time. The ring is rebuilt only when the candidates' names
or order change, or when a weight moves a point count by more than 1/16
(hysteresis, so a slow-start ramp rebuilds a few dozen times, not per
request). A rebuild is O(P log P) for P points: well under a millisecond for
a few backends, ~20 ms for 100 backends of weight 1. A lookup is one blake2b
and a bisect. Weights so large that P would pass ``MAX_RING_POINTS`` are scaled
down by a power of two.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from bisect import bisect_right
from collections.abc import Sequence

from llmproxy.balancing.base import B, NoCandidatesError, PickContext
from llmproxy.balancing.least_connections import least_loaded

#: Upper bound on the number of points on one ring (memory and rebuild time).
MAX_RING_POINTS = 1 << 18

# Each ring entry packs a point and its owner's index in the candidates:
# the point's top 48 bits, then 16 bits of owner index.
_OWNER_BITS = 16
_OWNER_MASK = (1 << _OWNER_BITS) - 1
_POINT_MASK = ~_OWNER_MASK & ((1 << 64) - 1)

# Domain separation: the ring's hash of a key must not correlate with the
# traffic split's hash of the same key (llmproxy.routing.split), or a pool
# reached through a 90/10 split would see keys from only 90% of its ring.
_KEY_PERSON = b"llmproxy.ring"
_POINT_PREFIX = b"llmproxy.ring.points\x00"


def key_point(key: str) -> int:
    """The ring position of a request key, in ``[0, 2**64)``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=_KEY_PERSON).digest()
    return int.from_bytes(digest, "big")


def backend_points(name: str, count: int) -> tuple[int, ...]:
    """The first ``count`` ring positions of backend ``name``, in ``[0, 2**64)``."""
    data = hashlib.shake_128(_POINT_PREFIX + name.encode()).digest(8 * count)
    return struct.unpack(f">{count}Q", data)


class ConsistentHashBalancer:
    """Sticky by ``ctx.hash_key`` with bounded loads; least-loaded when there is no key."""

    __slots__ = ("_built", "_load_factor", "_ring", "_ring_key", "_rng", "_vnodes")

    def __init__(
        self,
        rng: random.Random,
        *,
        vnodes_per_weight: int = 512,
        load_factor: float = 1.25,
    ) -> None:
        if vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be >= 1, got {vnodes_per_weight}")
        if not load_factor >= 1.0:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        self._rng = rng
        self._vnodes = vnodes_per_weight
        self._load_factor = load_factor
        #: (name, effective_weight) of the candidates the ring was last checked against.
        self._ring_key: tuple[tuple[str, float], ...] = ()
        #: (name, point count) the ring was built from.
        self._built: tuple[tuple[str, int], ...] = ()
        #: Sorted packed entries: point's top bits | owner's index in the candidates.
        self._ring: list[int] = []

    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        if not candidates:
            raise NoCandidatesError("consistent_hash: no eligible backend to pick from")
        if ctx.hash_key is None:
            return least_loaded(candidates, self._rng)
        ring_key = tuple((c.name, c.effective_weight) for c in candidates)
        if ring_key != self._ring_key:
            self._refresh(ring_key)
        total_in_flight = 0
        total_weight = 0.0
        for c in candidates:
            total_in_flight += c.in_flight
            total_weight += c.effective_weight
        per_weight = self._load_factor * (total_in_flight + 1) / total_weight
        ring = self._ring
        size = len(ring)
        idx = bisect_right(ring, key_point(ctx.hash_key))
        for _ in range(size):
            if idx == size:
                idx = 0
            c = candidates[ring[idx] & _OWNER_MASK]
            if c.in_flight < math.ceil(per_weight * c.effective_weight):
                return c
            idx += 1
        # Unreachable with load_factor >= 1 (see the module docstring); kept as a guard.
        return least_loaded(candidates, self._rng)

    def _refresh(self, ring_key: tuple[tuple[str, float], ...]) -> None:
        if len(ring_key) > _OWNER_MASK + 1:
            raise ValueError(f"consistent_hash supports at most {_OWNER_MASK + 1} backends")
        self._ring_key = ring_key
        scale = float(self._vnodes)
        while sum(scale * w for _, w in ring_key) > MAX_RING_POINTS and scale > 1e-6:
            scale /= 2
        wanted = tuple((name, max(1, round(scale * w))) for name, w in ring_key)
        if not _close_enough(wanted, self._built):
            self._rebuild(wanted)

    def _rebuild(self, counts: tuple[tuple[str, int], ...]) -> None:
        ring: list[int] = []
        for owner, (name, count) in enumerate(counts):
            ring.extend((p & _POINT_MASK) | owner for p in backend_points(name, count))
        ring.sort()
        self._ring = ring
        self._built = counts


def _close_enough(wanted: tuple[tuple[str, int], ...], built: tuple[tuple[str, int], ...]) -> bool:
    """Same names in the same order, and every count within 1/16 of the built one."""
    if len(wanted) != len(built):
        return False
    for (name, count), (built_name, built_count) in zip(wanted, built, strict=True):
        if name != built_name or abs(count - built_count) > built_count >> 4:
            return False
    return True
