"""A pool (Envoy's cluster): backends, their balancer, and the one notion of
"eligible backend" that every failure-handling component feeds.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator, Sequence

import aiohttp

from llmproxy.balancing.base import Balancer, NoCandidatesError, PickContext
from llmproxy.balancing.registry import make_balancer
from llmproxy.config.schema import PoolConfig
from llmproxy.pool.backend import Backend


class Pool:
    def __init__(self, config: PoolConfig, rng: random.Random) -> None:
        self.config = config
        self.name = config.name
        self.backends: list[Backend] = [Backend(b) for b in config.backends]
        self._by_name = {b.name: b for b in self.backends}
        self.balancer: Balancer = make_balancer(config.balancer, rng)
        t = config.timeouts
        #: First-byte, idle and total timeouts are the forwarder's watchdog;
        #: aiohttp only bounds the connect (``total=None`` so long streams live).
        self.client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def candidates(self) -> list[Backend]:
        """Backends that may take a new request now."""
        return [b for b in self.backends if b.eligible]

    @property
    def has_eligible(self) -> bool:
        return any(b.eligible for b in self.backends)

    def pick(self, ctx: PickContext, exclude: Collection[Backend] = ()) -> Backend | None:
        """Choose a backend for one attempt, or ``None`` when none is eligible.

        Backends already tried for this request (``exclude``) are passed over
        while an untried eligible one exists (Envoy's retry host predicate);
        when all eligible ones were tried, any eligible one may be picked again.
        """
        cands: Sequence[Backend] = self.candidates()
        if exclude and cands:
            untried = [b for b in cands if b not in exclude]
            if untried:
                cands = untried
        try:
            return self.balancer.pick(cands, ctx)
        except NoCandidatesError:
            return None
