from __future__ import annotations

import random
from collections import Counter

from llmproxy.balancing import PickContext, PowerOfTwoBalancer

from .fakes import CountingRandom, FakeBackend

CTX = PickContext()


def test_never_picks_the_most_loaded_of_three() -> None:
    balancer = PowerOfTwoBalancer(random.Random(0))
    pool = [FakeBackend("a", 1, 1), FakeBackend("hot", 1, 50), FakeBackend("c", 1, 5)]
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(10_000))
    assert counts["hot"] == 0
    # "a" wins every comparison it is in: 2 of the 3 equally likely pairs.
    assert abs(counts["a"] / 10_000 - 2 / 3) < 0.02


def test_load_is_compared_per_unit_weight() -> None:
    balancer = PowerOfTwoBalancer(random.Random(1))
    # 10/10 = 1.0 beats 3/1 = 3.0 and 4/2 = 2.0.
    pool = [FakeBackend("a", 1, 3), FakeBackend("big", 10, 10), FakeBackend("b", 2, 4)]
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(5_000))
    assert counts["a"] == 0  # the worst per weight loses every comparison


def test_two_candidates_the_less_loaded_wins_with_one_draw() -> None:
    rng = CountingRandom(2)
    balancer = PowerOfTwoBalancer(rng)
    pool = [FakeBackend("a", 1, 9), FakeBackend("b", 1, 1)]
    assert all(balancer.pick(pool, CTX).name == "b" for _ in range(100))
    assert rng.draws == 100


def test_one_candidate_draws_nothing() -> None:
    rng = CountingRandom()
    only = FakeBackend("only")
    assert PowerOfTwoBalancer(rng).pick([only], CTX) is only
    assert rng.draws == 0


def test_equal_load_ties_follow_the_weighted_first_draw() -> None:
    balancer = PowerOfTwoBalancer(random.Random(3))
    pool = [FakeBackend("a", 1, 2), FakeBackend("b", 3, 6)]  # both score 2.0
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(8_000))
    assert abs(counts["b"] / 8_000 - 0.75) < 0.02
