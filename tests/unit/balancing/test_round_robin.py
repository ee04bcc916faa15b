from __future__ import annotations

import random

from llmproxy.balancing import PickContext, RoundRobinBalancer

from .fakes import CountingRandom, backends

CTX = PickContext()


def test_cycles_in_order_and_ignores_weights() -> None:
    balancer = RoundRobinBalancer(random.Random(0))
    pool = backends(1, 5, 100)
    assert [balancer.pick(pool, CTX).name for _ in range(7)] == [
        "b0", "b1", "b2", "b0", "b1", "b2", "b0",
    ]  # fmt: skip


def test_ignores_load() -> None:
    balancer = RoundRobinBalancer(random.Random(0))
    pool = backends(1, 1)
    pool[0].in_flight = 1_000
    assert [balancer.pick(pool, CTX).name for _ in range(4)] == ["b0", "b1", "b0", "b1"]


def test_cursor_wraps_when_the_set_shrinks_and_grows() -> None:
    balancer = RoundRobinBalancer(random.Random(0))
    pool = backends(1, 1, 1, 1)
    assert [balancer.pick(pool, CTX).name for _ in range(3)] == ["b0", "b1", "b2"]
    # The cursor (3) is past the end of a 2-element set: it wraps, no IndexError.
    assert [balancer.pick(pool[:2], CTX).name for _ in range(3)] == ["b1", "b0", "b1"]
    # Grown back: rotation continues from the cursor, over all four.
    assert [balancer.pick(pool, CTX).name for _ in range(4)] == ["b2", "b3", "b0", "b1"]


def test_draws_no_randomness() -> None:
    rng = CountingRandom()
    balancer = RoundRobinBalancer(rng)
    for _ in range(10):
        balancer.pick(backends(1, 1, 1), CTX)
    assert rng.draws == 0
