"""The state of one simulated replica, stored in its app under :data:`REPLICA`.

Counting is exact: every generation request is counted once in ``requests``
when it arrives, and once more, when it ends, in exactly one outcome counter
(``completed``, ``cancelled``, ``cut``, ``errors_injected`` or ``rejected``).
So ``requests == sum(outcomes) + running + waiting + hanging + (requests
being read or validated)``, and a test can prove what a gateway did to a
replica from ``GET /sim/stats``.
"""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from llmproxy.sim.config import SimConfig, faults_of
from llmproxy.sim.gate import ConcurrencyGate
from llmproxy.sim.metrics import SimMetrics


class Outcome(enum.Enum):
    COMPLETED = "completed"
    #: The client went away before the response ended.
    CANCELLED = "cancelled"
    #: The replica closed the connection on purpose (``cut_after_tokens``).
    CUT = "cut"
    ERROR_INJECTED = "errors_injected"
    #: The request was invalid (400, 404, 422).
    REJECTED = "rejected"


@dataclass(slots=True)
class Stats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    cut: int = 0
    errors_injected: int = 0
    rejected: int = 0
    health_checks: int = 0
    #: Generation requests waiting forever because ``hang`` is set.
    hanging: int = 0
    #: Headers of the latest generation request, names lower-cased.
    last_headers: dict[str, str] = field(default_factory=dict)

    def count(self, outcome: Outcome) -> None:
        name = outcome.value
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        """Zero the counters; ``hanging`` counts live requests and stays."""
        self.requests = self.completed = self.cancelled = self.cut = 0
        self.errors_injected = self.rejected = self.health_checks = 0
        self.last_headers = {}


class Replica:
    """Everything a request handler of the simulator needs."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.gate = ConcurrencyGate(cfg.max_concurrency)
        self.metrics = SimMetrics(cfg.model, self.gate)
        #: Decides which requests fail when ``0 < error_rate < 1``.
        self.rng = random.Random(cfg.seed)
        #: The faults set at start, restored by ``DELETE /sim/faults``.
        self.initial_faults = faults_of(cfg)

    def track(self, request: web.Request) -> Ticket:
        return Ticket(self.stats, request)

    def should_fail(self) -> bool:
        rate = self.cfg.error_rate
        if rate <= 0.0:
            return False
        return rate >= 1.0 or self.rng.random() < rate

    def first_token_delay(self) -> float:
        """Seconds before the first token."""
        return self.cfg.ttft_ms / 1000.0 * self.cfg.slow_factor

    def token_gap(self) -> float:
        """Seconds between two tokens; 0 when ``tokens_per_s`` is 0."""
        rate = self.cfg.tokens_per_s
        return self.cfg.slow_factor / rate if rate > 0 else 0.0

    async def hang(self) -> None:
        """Wait until cancelled, i.e. until the client goes away."""
        self.stats.hanging += 1
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.stats.hanging -= 1

    def stats_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": s.requests,
            "completed": s.completed,
            "cancelled": s.cancelled,
            "cut": s.cut,
            "errors_injected": s.errors_injected,
            "rejected": s.rejected,
            "running": self.gate.running,
            "waiting": self.gate.waiting,
            "hanging": s.hanging,
            "health_checks": s.health_checks,
            "last_headers": s.last_headers,
        }


class Ticket:
    """Counts one generation request: on arrival, and by outcome when it ends.

    The handler sets :attr:`outcome` before it returns; a cancellation (the
    client went away while the handler awaited) is counted as ``cancelled``.
    """

    __slots__ = ("_stats", "outcome")

    def __init__(self, stats: Stats, request: web.Request) -> None:
        self._stats = stats
        stats.requests += 1
        stats.last_headers = {name.lower(): value for name, value in request.headers.items()}
        self.outcome = Outcome.COMPLETED

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._stats.count(self.outcome)
        elif issubclass(exc_type, asyncio.CancelledError | ConnectionResetError):
            self._stats.count(Outcome.CANCELLED)


REPLICA = web.AppKey("llmproxy_sim_replica", Replica)
