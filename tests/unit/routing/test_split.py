from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from multidict import CIMultiDict

from llmproxy.config.schema import RouteConfig, RouteMatch, SplitTarget
from llmproxy.routing import choose_pool, split_point, sticky_key

CANARY_90_10 = (SplitTarget("stable", 90), SplitTarget("canary", 10))


def route_with(sticky: str) -> RouteConfig:
    return RouteConfig(name="r", match=RouteMatch(), split=CANARY_90_10, sticky=sticky)


class NoDrawRandom(random.Random):
    def random(self) -> float:
        raise AssertionError("rng used")


def test_sticky_key_from_header_api_key_ip_or_none() -> None:
    headers = CIMultiDict({"X-User-Id": "u-1"})
    assert sticky_key(route_with("header:X-User-Id"), headers, "k", "1.2.3.4") == "u-1"
    assert sticky_key(route_with("header:x-user-id"), headers, "k", "1.2.3.4") == "u-1"
    assert sticky_key(route_with("header:x-missing"), headers, "k", "1.2.3.4") is None
    assert sticky_key(route_with("api_key"), headers, "k", "1.2.3.4") == "k"
    assert sticky_key(route_with("api_key"), headers, None, "1.2.3.4") is None
    assert sticky_key(route_with("ip"), headers, "k", "1.2.3.4") == "1.2.3.4"
    assert sticky_key(route_with("none"), headers, "k", "1.2.3.4") is None


def test_empty_sticky_value_counts_as_missing() -> None:
    assert sticky_key(route_with("header:x-user-id"), {"x-user-id": ""}, None, None) is None
    assert sticky_key(route_with("api_key"), {}, "", None) is None


def test_unknown_sticky_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="cookie"):
        sticky_key(route_with("cookie"), {}, None, None)


def test_single_target_does_not_touch_the_rng() -> None:
    assert choose_pool((SplitTarget("only", 3),), None, NoDrawRandom()) == "only"
    assert choose_pool((SplitTarget("only", 3),), "user", NoDrawRandom()) == "only"


def test_a_keyed_choice_does_not_touch_the_rng() -> None:
    assert choose_pool(CANARY_90_10, "user-1", NoDrawRandom()) in {"stable", "canary"}


def test_same_key_same_pool() -> None:
    rng = random.Random(0)
    for key in ("alice", "bob", "carol"):
        first = choose_pool(CANARY_90_10, key, rng)
        assert all(choose_pool(CANARY_90_10, key, rng) == first for _ in range(1_000))


def test_keyed_split_follows_weights() -> None:
    rng = random.Random(0)
    counts = Counter(choose_pool(CANARY_90_10, f"user-{i}", rng) for i in range(20_000))
    assert abs(counts["canary"] / 20_000 - 0.10) <= 0.02


def test_unkeyed_split_follows_weights() -> None:
    rng = random.Random(1)
    counts = Counter(choose_pool(CANARY_90_10, None, rng) for _ in range(20_000))
    assert abs(counts["canary"] / 20_000 - 0.10) <= 0.02


def test_unkeyed_split_is_exact_for_a_seed() -> None:
    a = [choose_pool(CANARY_90_10, None, random.Random(7)) for _ in range(3)]
    b = [choose_pool(CANARY_90_10, None, random.Random(7)) for _ in range(3)]
    assert a == b


def test_three_way_split_in_configured_order() -> None:
    split = (SplitTarget("a", 1), SplitTarget("b", 2), SplitTarget("c", 1))
    counts = Counter(choose_pool(split, f"k{i}", random.Random(0)) for i in range(20_000))
    assert abs(counts["a"] / 20_000 - 0.25) <= 0.02
    assert abs(counts["b"] / 20_000 - 0.50) <= 0.02


def test_ranges_follow_the_configured_order() -> None:
    # split_point("alice") = 0.741...: 2.96 of a total weight of 4.
    rng = NoDrawRandom()
    forward = (SplitTarget("a", 1), SplitTarget("b", 1), SplitTarget("c", 2))
    assert choose_pool(forward, "alice", rng) == "c"  # c holds [2, 4)
    assert choose_pool(forward[::-1], "alice", rng) == "b"  # c [0, 2), b [2, 3)


def test_zero_weight_target_is_never_chosen() -> None:
    rng = random.Random(2)
    for split in (
        (SplitTarget("stable", 1), SplitTarget("canary", 0)),
        (SplitTarget("canary", 0), SplitTarget("stable", 1)),
        (SplitTarget("a", 1), SplitTarget("canary", 0), SplitTarget("b", 1)),
    ):
        for i in range(5_000):
            assert choose_pool(split, f"user-{i}", rng) != "canary"
            assert choose_pool(split, None, rng) != "canary"


@pytest.mark.parametrize(
    "split",
    [
        (SplitTarget("a", 0), SplitTarget("b", 0)),
        (SplitTarget("a", 0),),
        (SplitTarget("a", 2), SplitTarget("b", -1)),
        (),
    ],
)
def test_no_positive_weight_or_a_negative_one_is_an_error(split: tuple[SplitTarget, ...]) -> None:
    with pytest.raises(ValueError, match="weight"):
        choose_pool(split, "user", random.Random(0))
    with pytest.raises(ValueError, match="weight"):
        choose_pool(split, None, random.Random(0))


def test_raising_the_canary_only_moves_users_into_it() -> None:
    keys = [f"user-{i}" for i in range(5_000)]
    rng = random.Random(0)
    before = {k: choose_pool(CANARY_90_10, k, rng) for k in keys}
    ramped = (SplitTarget("stable", 80), SplitTarget("canary", 20))
    after = {k: choose_pool(ramped, k, rng) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved
    assert all(before[k] == "stable" and after[k] == "canary" for k in moved)


def test_split_point_is_a_fixed_hash_not_python_hash() -> None:
    assert split_point("user-42") == 0.9748854680196641
    assert split_point("alice") == 0.7412050658098643
    code = "from llmproxy.routing import split_point; print(repr(split_point('alice')))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert float(out.stdout) == 0.7412050658098643


def test_split_point_is_in_the_unit_interval() -> None:
    points = [split_point(f"k{i}") for i in range(10_000)]
    assert all(0.0 <= p < 1.0 for p in points)
