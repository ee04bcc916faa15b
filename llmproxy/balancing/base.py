"""The balancer protocol shared by every strategy.

A balancer is pure and synchronous: given the eligible candidates of one pool
and a :class:`PickContext`, it returns one of them. It may keep its own small
state (a round-robin cursor, a hash ring) but does no I/O and reads no clock;
randomness comes from the ``random.Random`` it was built with, so unit tests
are exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple, Protocol, TypeVar


class BackendView(Protocol):
    """What a balancer may read of a backend."""

    @property
    def name(self) -> str: ...

    @property
    def effective_weight(self) -> float:
        """Configured weight, possibly reduced (slow start, latency outlier); > 0."""
        ...

    @property
    def in_flight(self) -> int: ...


B = TypeVar("B", bound=BackendView)


class PickContext(NamedTuple):
    """What a balancer may know of the request. A named tuple, not a frozen
    dataclass: as immutable, and built in 0.28 µs against 0.44 (timeit), once
    a request."""

    #: Key for ``consistent_hash`` (a user id, an API key hash...); ``None``
    #: when the request carries none, and the balancer then falls back to
    #: least-loaded choice.
    hash_key: str | None = None


class NoCandidatesError(LookupError):
    """``pick`` was called with no candidates: the caller must handle an empty pool."""


class Balancer(Protocol):
    def pick(self, candidates: Sequence[B], ctx: PickContext) -> B:
        """Return one element of ``candidates``; raise NoCandidatesError if empty."""
        ...


class BalancerFactory(Protocol):
    def __call__(self, rng: random.Random) -> Balancer: ...
