"""Load balancing: one module per strategy, a registry by configuration name.

Every strategy implements :class:`~llmproxy.balancing.base.Balancer`: pure,
synchronous, called once per request with the pool's eligible backends.
"""

from llmproxy.balancing.base import (
    BackendView,
    Balancer,
    BalancerFactory,
    NoCandidatesError,
    PickContext,
)
from llmproxy.balancing.consistent_hash import ConsistentHashBalancer
from llmproxy.balancing.least_connections import LeastConnectionsBalancer
from llmproxy.balancing.power_of_two import PowerOfTwoBalancer
from llmproxy.balancing.random_choice import RandomBalancer
from llmproxy.balancing.registry import BALANCER_REGISTRY, UnknownBalancerError, make_balancer
from llmproxy.balancing.round_robin import RoundRobinBalancer
from llmproxy.balancing.weighted_round_robin import WeightedRoundRobinBalancer

__all__ = [
    "BALANCER_REGISTRY",
    "BackendView",
    "Balancer",
    "BalancerFactory",
    "ConsistentHashBalancer",
    "LeastConnectionsBalancer",
    "NoCandidatesError",
    "PickContext",
    "PowerOfTwoBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "UnknownBalancerError",
    "WeightedRoundRobinBalancer",
    "make_balancer",
]
