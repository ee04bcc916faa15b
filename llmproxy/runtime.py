"""What one loaded config becomes at run time: the route table and the pools.

The forwarder reads ``Gateway.runtime`` once per request; a reload builds a new
``Runtime`` (carrying over the state of backends that stay) and swaps the
reference, so a request sees one config throughout.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from llmproxy.config.schema import BackendConfig, Config
from llmproxy.pool.pool import Pool, PoolEvents
from llmproxy.routing.table import RouteTable


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    table: RouteTable
    pools: dict[str, Pool]
    #: The clock every component of this runtime reads (the loop's, in seconds).
    clock: Callable[[], float]

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        events: PoolEvents,
        previous: Runtime | None = None,
        discovered: Mapping[str, tuple[BackendConfig, ...]] | None = None,
    ) -> Runtime:
        """``discovered``: the current backends of pools that use DNS discovery."""
        old = previous.pools if previous is not None else {}
        found = discovered or {}
        pools = {
            name: Pool(
                replace(pc, backends=found.get(name, ())) if pc.discovery else pc,
                rng=rng,
                clock=clock,
                events=events,
                previous=old.get(name),
                running=previous is not None,
            )
            for name, pc in config.pools.items()
        }
        return cls(config=config, table=RouteTable(config.routes), pools=pools, clock=clock)

    def route_pools(self) -> set[str]:
        return {
            name
            for route in self.config.routes
            for name in (*(t.pool for t in route.split), *route.fallback)
        }

    @property
    def ready(self) -> bool:
        """At least one route has a pool with an eligible backend."""
        return any(self.pools[name].has_eligible for name in self.route_pools())
