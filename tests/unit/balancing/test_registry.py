from __future__ import annotations

import random

import pytest

from llmproxy.balancing import (
    BALANCER_REGISTRY,
    ConsistentHashBalancer,
    RoundRobinBalancer,
    UnknownBalancerError,
    make_balancer,
)
from llmproxy.config.schema import BALANCERS


def test_registry_names_are_exactly_the_config_schema_names() -> None:
    assert tuple(BALANCER_REGISTRY) == BALANCERS


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        BALANCER_REGISTRY["mine"] = RoundRobinBalancer  # type: ignore[index]


def test_make_balancer_builds_a_new_instance_each_time() -> None:
    a = make_balancer("consistent_hash", random.Random(0))
    b = make_balancer("consistent_hash", random.Random(0))
    assert isinstance(a, ConsistentHashBalancer)
    assert a is not b


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBalancerError) as info:
        make_balancer("least_conn", random.Random(0))
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'least_conn'" in message
    for name in BALANCERS:
        assert name in message
