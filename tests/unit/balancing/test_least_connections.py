from __future__ import annotations

import random
from collections import Counter
from itertools import pairwise

from llmproxy.balancing import LeastConnectionsBalancer, PickContext

from .fakes import CountingRandom, FakeBackend

CTX = PickContext()


def test_picks_the_lowest_in_flight_per_weight() -> None:
    balancer = LeastConnectionsBalancer(random.Random(0))
    # Scores 4, 3, 2: the heavily loaded but heavy backend wins.
    pool = [FakeBackend("a", 1, 4), FakeBackend("b", 2, 6), FakeBackend("c", 5, 10)]
    assert all(balancer.pick(pool, CTX).name == "c" for _ in range(100))


def test_no_randomness_without_a_tie() -> None:
    rng = CountingRandom()
    balancer = LeastConnectionsBalancer(rng)
    pool = [FakeBackend("a", 1, 3), FakeBackend("b", 1, 1), FakeBackend("c", 1, 2)]
    assert balancer.pick(pool, CTX).name == "b"
    assert rng.draws == 0


def test_ties_alternate_and_the_loaded_one_is_never_chosen() -> None:
    balancer = LeastConnectionsBalancer(random.Random(1))
    pool = [FakeBackend("a", 1, 2), FakeBackend("busy", 1, 5), FakeBackend("c", 1, 2)]
    picks = [balancer.pick(pool, CTX).name for _ in range(10_000)]
    counts = Counter(picks)
    assert counts["busy"] == 0
    assert abs(counts["a"] / 10_000 - 0.5) < 0.02
    # Not stuck on one: the choice changes often (a fair coin changes half the time).
    changes = sum(1 for x, y in pairwise(picks) if x != y)
    assert changes > 4_000


def test_ties_are_broken_in_proportion_to_weight() -> None:
    balancer = LeastConnectionsBalancer(random.Random(2))
    # Scores 1.0, 1.0, 1.0: tied, weights 1:3:4.
    pool = [FakeBackend("a", 1, 1), FakeBackend("b", 3, 3), FakeBackend("c", 4, 4)]
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(16_000))
    assert abs(counts["a"] / 16_000 - 1 / 8) < 0.02
    assert abs(counts["b"] / 16_000 - 3 / 8) < 0.02
    assert abs(counts["c"] / 16_000 - 4 / 8) < 0.02


def test_follows_load_as_it_changes() -> None:
    balancer = LeastConnectionsBalancer(random.Random(3))
    pool = [FakeBackend("a"), FakeBackend("b")]
    # Each pick adds a request: the two stay within one of each other.
    for _ in range(100):
        balancer.pick(pool, CTX).in_flight += 1
        assert abs(pool[0].in_flight - pool[1].in_flight) <= 1
