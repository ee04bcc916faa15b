from __future__ import annotations

import random
from collections import Counter

from llmproxy.balancing import PickContext, WeightedRoundRobinBalancer

from .fakes import FakeBackend, backends

CTX = PickContext()


def test_nginx_smooth_sequence_for_5_1_1() -> None:
    balancer = WeightedRoundRobinBalancer(random.Random(0))
    pool = [FakeBackend("a", 5), FakeBackend("b", 1), FakeBackend("c", 1)]
    picks = "".join(balancer.pick(pool, CTX).name for _ in range(14))
    assert picks == "aabacaa" * 2


def test_float_weights_give_exact_counts_per_cycle() -> None:
    balancer = WeightedRoundRobinBalancer(random.Random(0))
    pool = backends(0.5, 0.25, 0.25)
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(400))
    assert counts == {"b0": 200, "b1": 100, "b2": 100}


def test_equal_weights_rotate() -> None:
    balancer = WeightedRoundRobinBalancer(random.Random(0))
    pool = backends(2, 2, 2)
    assert [balancer.pick(pool, CTX).name for _ in range(6)] == ["b0", "b1", "b2"] * 2


def test_a_backend_that_joins_gets_its_share_at_once() -> None:
    balancer = WeightedRoundRobinBalancer(random.Random(0))
    pool = backends(1, 1, 2)
    for _ in range(5):
        balancer.pick(pool[:2], CTX)
    counts = Counter(balancer.pick(pool, CTX).name for _ in range(400))
    assert counts == {"b0": 100, "b1": 100, "b2": 200}


def test_state_of_departed_backends_is_dropped() -> None:
    balancer = WeightedRoundRobinBalancer(random.Random(0))
    steady = backends(1, 1)
    for i in range(1_000):
        # A different third backend every call: its state must not accumulate.
        balancer.pick([*steady, FakeBackend(f"transient-{i}")], CTX)
        balancer.pick(steady, CTX)
    assert len(balancer._current) == 2
