from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from llmproxy.balancing import ConsistentHashBalancer, PickContext
from llmproxy.balancing.consistent_hash import MAX_RING_POINTS, backend_points, key_point

from .fakes import CountingRandom, FakeBackend, backends

KEYS = [f"user-{i}" for i in range(10_000)]


def owners(balancer: ConsistentHashBalancer, pool: list[FakeBackend]) -> dict[str, str]:
    return {k: balancer.pick(pool, PickContext(hash_key=k)).name for k in KEYS}


def capacity(pool: list[FakeBackend], backend: FakeBackend, load_factor: float = 1.25) -> int:
    total_in_flight = sum(b.in_flight for b in pool)
    total_weight = sum(b.effective_weight for b in pool)
    return math.ceil(load_factor * (total_in_flight + 1) * backend.effective_weight / total_weight)


def test_hashes_are_stable_values_not_python_hash() -> None:
    # Fixed forever: changing them would remap every user of a running fleet.
    assert key_point("user-42") == 11142041383729742344
    assert backend_points("b0", 3) == (
        12083828592403099912,
        16072664135040675704,
        6379473778923495315,
    )
    # A backend's first points do not depend on how many it has.
    assert backend_points("b0", 600)[:3] == backend_points("b0", 3)


def test_same_key_same_backend_whatever_the_rng_or_order() -> None:
    pool = backends(1, 1, 1, 1)
    first = ConsistentHashBalancer(random.Random(0))
    home = first.pick(pool, PickContext(hash_key="alice")).name
    assert all(first.pick(pool, PickContext(hash_key="alice")).name == home for _ in range(1_000))
    other = ConsistentHashBalancer(random.Random(99))
    shuffled = pool[::-1]
    assert other.pick(shuffled, PickContext(hash_key="alice")).name == home


def test_draws_no_randomness_with_a_key() -> None:
    rng = CountingRandom()
    balancer = ConsistentHashBalancer(rng)
    pool = backends(1, 1, 1)
    for k in KEYS[:100]:
        balancer.pick(pool, PickContext(hash_key=k))
    assert rng.draws == 0


def test_removing_a_backend_moves_only_its_keys() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = backends(1, 1, 1, 1, 1)
    before = owners(balancer, pool)
    after = owners(balancer, [b for b in pool if b.name != "b2"])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "b2"}
    # They spread over all the others rather than piling onto one neighbour.
    spread = Counter(after[k] for k in moved)
    assert set(spread) == {"b0", "b1", "b3", "b4"}
    assert max(spread.values()) < 0.4 * len(moved)


def test_adding_a_backend_moves_keys_only_onto_it() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = backends(1, 1, 1, 1, 1, 1)
    before = owners(balancer, pool[:5])
    after = owners(balancer, pool)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "b5" for k in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 6) < 0.03


def test_a_hot_key_never_pushes_a_backend_past_its_capacity() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = backends(1, 1, 2, 1)
    home = balancer.pick(pool, PickContext(hash_key="hot")).name
    for _ in range(2_000):
        caps = {b.name: capacity(pool, b) for b in pool}
        chosen = balancer.pick(pool, PickContext(hash_key="hot"))
        assert chosen.in_flight < caps[chosen.name]
        chosen.in_flight += 1
    # The key spilled over from its home, which holds as much as it may, and no
    # backend carries more than load_factor times its fair share (+1 rounding).
    total = sum(b.in_flight for b in pool)
    assert len([b for b in pool if b.in_flight > 0]) >= 2
    for b in pool:
        assert b.in_flight <= 1.25 * total * b.effective_weight / 5 + 1
    home_backend = next(b for b in pool if b.name == home)
    assert home_backend.in_flight >= 1.25 * total * home_backend.effective_weight / 5 - 1


def test_bounded_load_with_a_hot_key_among_many_under_churn() -> None:
    rng = random.Random(1)
    balancer = ConsistentHashBalancer(random.Random(2))
    pool = backends(1, 1, 1, 1, 1)
    outstanding: list[FakeBackend] = []
    for i in range(20_000):
        if len(outstanding) >= 60:
            done = outstanding.pop(rng.randrange(len(outstanding)))
            done.in_flight -= 1
        key = "hot" if i % 2 else f"user-{i}"
        caps = {b.name: capacity(pool, b) for b in pool}
        chosen = balancer.pick(pool, PickContext(hash_key=key))
        assert chosen.in_flight < caps[chosen.name]
        chosen.in_flight += 1
        outstanding.append(chosen)


def test_an_unloaded_hot_key_stays_home() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = backends(1, 1, 1)
    home = balancer.pick(pool, PickContext(hash_key="hot"))
    home.in_flight += 1
    # The home is now at capacity ceil(1.25 * 2 / 3) = 1: the key spills over...
    spill = balancer.pick(pool, PickContext(hash_key="hot"))
    assert spill is not home
    # ...and comes back as soon as the home has room again.
    home.in_flight -= 1
    assert balancer.pick(pool, PickContext(hash_key="hot")) is home


def test_without_a_key_it_is_least_connections() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = [FakeBackend("a", 1, 5), FakeBackend("b", 2, 4), FakeBackend("c", 1, 3)]
    assert all(balancer.pick(pool, PickContext()).name == "b" for _ in range(50))


def test_ring_is_rebuilt_only_when_the_set_or_point_counts_change() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = backends(1, 1, 1)
    ctx = PickContext(hash_key="k")
    balancer.pick(pool, ctx)
    ring = balancer._ring
    balancer.pick(pool, ctx)
    assert balancer._ring is ring
    pool[0].effective_weight = 1.05  # 512 -> 538 points: within 1/16, kept
    balancer.pick(pool, ctx)
    assert balancer._ring is ring
    pool[0].effective_weight = 0.5  # 512 -> 256 points: rebuilt
    balancer.pick(pool, ctx)
    assert balancer._ring is not ring
    ring = balancer._ring
    balancer.pick(pool[:2], ctx)
    assert balancer._ring is not ring
    assert len(balancer._ring) == 256 + 512


def test_ring_size_is_capped_for_huge_weights() -> None:
    balancer = ConsistentHashBalancer(random.Random(0))
    pool = backends(1_000, 2_000, 5_000)
    counts = Counter(balancer.pick(pool, PickContext(hash_key=k)).name for k in KEYS)
    assert len(balancer._ring) <= MAX_RING_POINTS
    assert abs(counts["b2"] / len(KEYS) - 5 / 8) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"vnodes_per_weight": 0}, "vnodes_per_weight"), ({"load_factor": 0.9}, "load_factor")],
)
def test_rejects_settings_that_break_its_guarantees(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConsistentHashBalancer(random.Random(0), **kwargs)  # type: ignore[arg-type]
