from __future__ import annotations

import random
from collections import Counter

from llmproxy.balancing import PickContext, RandomBalancer
from llmproxy.balancing.random_choice import weighted_index

from .fakes import CountingRandom, FakeBackend, backends

CTX = PickContext()


def test_weighted_index_maps_points_onto_cumulative_weights() -> None:
    pool = backends(1, 2, 5)
    assert [weighted_index(pool, p) for p in (0, 0.99, 1, 2.99, 3, 7.99)] == [0, 0, 1, 1, 2, 2]
    # Past the end (float rounding): the last one.
    assert weighted_index(pool, 8.0) == 2


def test_weighted_index_skips_the_excluded_candidate() -> None:
    pool = backends(1, 2, 5)
    # Without b1 the cumulative weights are 1 (b0) and 6 (b2).
    assert [weighted_index(pool, p, skip=1) for p in (0.5, 1, 5.99)] == [0, 2, 2]
    assert weighted_index(pool, 6.0, skip=2) == 1


def test_ignores_load() -> None:
    balancer = RandomBalancer(random.Random(0))
    pool = [FakeBackend("a", 1, 1_000), FakeBackend("b", 1, 0)]
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.5) < 0.02


def test_one_candidate_draws_nothing() -> None:
    rng = CountingRandom()
    only = FakeBackend("only")
    assert RandomBalancer(rng).pick([only], CTX) is only
    assert rng.draws == 0


def test_same_seed_same_sequence() -> None:
    pool = backends(1, 2, 5)
    a = RandomBalancer(random.Random(42))
    b = RandomBalancer(random.Random(42))
    assert [a.pick(pool, CTX).name for _ in range(50)] == [
        b.pick(pool, CTX).name for _ in range(50)
    ]
