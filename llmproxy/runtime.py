"""What one loaded config becomes at run time: the route table and the pools.

The forwarder reads ``Gateway.runtime`` once per request; a reload builds a new
``Runtime`` and swaps the reference, so a request sees one config throughout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmproxy.config.schema import Config
from llmproxy.pool.pool import Pool
from llmproxy.routing.table import RouteTable


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    table: RouteTable
    pools: dict[str, Pool]

    @classmethod
    def build(cls, config: Config, rng: random.Random) -> Runtime:
        pools = {name: Pool(pc, rng) for name, pc in config.pools.items()}
        return cls(config=config, table=RouteTable(config.routes), pools=pools)

    @property
    def ready(self) -> bool:
        """At least one route has a pool with an eligible backend."""
        for route in self.config.routes:
            for name in (*(t.pool for t in route.split), *route.fallback):
                if self.pools[name].has_eligible:
                    return True
        return False
