"""The balancers by configuration name.

The names are exactly :data:`llmproxy.config.schema.BALANCERS` (a test holds
them equal), so a name that passed config validation always resolves here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType

from llmproxy.balancing.base import Balancer, BalancerFactory
from llmproxy.balancing.consistent_hash import ConsistentHashBalancer
from llmproxy.balancing.least_connections import LeastConnectionsBalancer
from llmproxy.balancing.power_of_two import PowerOfTwoBalancer
from llmproxy.balancing.random_choice import RandomBalancer
from llmproxy.balancing.round_robin import RoundRobinBalancer
from llmproxy.balancing.weighted_round_robin import WeightedRoundRobinBalancer

#: Read-only: name → factory taking the ``random.Random`` the balancer draws from.
BALANCER_REGISTRY: Mapping[str, BalancerFactory] = MappingProxyType(
    {
        "round_robin": RoundRobinBalancer,
        "weighted_round_robin": WeightedRoundRobinBalancer,
        "least_connections": LeastConnectionsBalancer,
        "power_of_two": PowerOfTwoBalancer,
        "random": RandomBalancer,
        "consistent_hash": ConsistentHashBalancer,
    }
)


class UnknownBalancerError(KeyError):
    """A balancer name that is not in :data:`BALANCER_REGISTRY`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        # KeyError's own __str__ would repr() the whole message.
        known = ", ".join(BALANCER_REGISTRY)
        return f"unknown balancer {self.name!r}; known balancers: {known}"


def make_balancer(name: str, rng: random.Random) -> Balancer:
    """A new balancer of the named strategy; each pool gets its own instance."""
    try:
        factory = BALANCER_REGISTRY[name]
    except KeyError:
        raise UnknownBalancerError(name) from None
    return factory(rng)
