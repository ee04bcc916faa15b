"""One client request across its upstream attempts, and the plan of which
backends it may try (pools in order: the split's choice, then fallbacks)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from llmproxy.balancing.base import PickContext
from llmproxy.observability.metrics import NONE, Metrics
from llmproxy.observability.tracing import NOOP_SPAN, RequestSpan
from llmproxy.pool.backend import Backend
from llmproxy.pool.pool import Pool


@dataclass(slots=True, eq=False)
class Exchange:
    request: web.BaseRequest
    request_id: str
    #: Loop time when the request arrived.
    started: float
    task: asyncio.Task[object] | None = None
    client_ip: str | None = None
    body: bytes | None = None
    #: The client's Authorization header, when it may go upstream (no gateway auth).
    client_authorization: str | None = None
    api_key_name: str | None = None
    span: RequestSpan = NOOP_SPAN
    #: The stream's usage chunk was asked for by the gateway: hide it.
    strip_usage: bool = False
    #: Added to the response (x-ratelimit-*).
    response_headers: dict[str, str] | None = None
    #: Rate-limit admission to settle when the response ends (a Ticket).
    ticket: object | None = None
    chunks: int = 0
    upstream_headers: CIMultiDict[str] | None = None
    route: str = NONE
    pool: str = NONE
    backend: str = NONE
    attempts: int = 0
    #: Set when the gateway ends this request itself (shutdown after the
    #: drain timeout): the message for the client.
    aborting: str | None = None
    # -- the outcome, filled in as the request goes (RequestOutcome) ----------
    #: Status sent to the client; 499 if the client left first (nginx's code).
    status: int = 499
    #: Seconds from arrival to the first body byte sent to the client.
    ttfb_s: float | None = None
    bytes_sent: int = 0
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: ok, client_closed, upstream_error, midstream_error, timeout, rejected...
    outcome: str = "client_closed"
    error: str | None = None


@dataclass(slots=True)
class Plan:
    """Which backend the next attempt goes to.

    Pools are tried in order; within a pool, up to its ``retry.attempts``
    attempts. A backend already tried for this request is never tried again
    while an untried eligible one exists, in this pool or a later one (Envoy's
    retry host predicate): a failed canary attempt moves to the stable pool
    rather than retrying the same canary replica. A pool with no eligible
    backend is skipped (route fallback); in panic mode it yields the backend
    that failed least recently instead.
    """

    pools: list[Pool]
    ctx: PickContext
    metrics: Metrics
    index: int = 0
    tried: list[Backend] = field(default_factory=list)
    in_pool: int = 0

    @property
    def primary(self) -> Pool:
        return self.pools[0]

    @property
    def max_attempts(self) -> int:
        return sum(p.config.retry.attempts for p in self.pools)

    def next(self) -> tuple[Pool, Backend, bool] | None:
        """(pool, backend, holds a breaker permit) for the next attempt, or None."""
        while self.index < len(self.pools):
            pool = self.pools[self.index]
            if self.in_pool < pool.config.retry.attempts:
                backend = pool.acquire(self.ctx, self.tried)
                if backend is not None:
                    if backend not in self.tried or not self._later_has_untried():
                        return self._take(pool, backend, permit=True)
                    pool.record_neutral(backend, permit=True)  # give the permit back
                elif self.in_pool == 0:
                    if pool.config.panic_mode and (panic := pool.panic_pick()) is not None:
                        self.metrics.no_backend.labels(pool.name, "panic").inc()
                        return self._take(pool, panic, permit=False)
                    self.metrics.no_backend.labels(pool.name, "skipped").inc()
            self.index += 1
            self.in_pool = 0
        return None

    def next_pool(self) -> Pool | None:
        """The pool the next attempt would go to (no permit taken): the one
        whose retry budget pays for the retry."""
        now = self.primary.clock()
        for i in range(self.index, len(self.pools)):
            pool = self.pools[i]
            used = self.in_pool if i == self.index else 0
            if used >= pool.config.retry.attempts:
                continue
            cands = pool.candidates(now)
            untried = [b for b in cands if b not in self.tried]
            if untried or (cands and not self._later_has_untried(i)):
                return pool
            if not cands and used == 0 and pool.config.panic_mode:
                return pool
        return None

    def has_next(self) -> bool:
        """Whether another attempt could be made (cheap check, no permit taken)."""
        return self.next_pool() is not None

    def _later_has_untried(self, index: int | None = None) -> bool:
        now = self.primary.clock()
        start = (self.index if index is None else index) + 1
        return any(b not in self.tried for pool in self.pools[start:] for b in pool.candidates(now))

    def _take(self, pool: Pool, backend: Backend, *, permit: bool) -> tuple[Pool, Backend, bool]:
        self.in_pool += 1
        self.tried.append(backend)
        return pool, backend, permit


class PlanBudget:
    """The retry budget of the pool the next attempt goes to: retries are
    paid for by the pool that receives them, so a small canary pool does not
    spend its budget on failures that the stable pool absorbs."""

    def __init__(self, plan: Plan, metrics: Metrics) -> None:
        self._plan = plan
        self._metrics = metrics

    def try_spend(self) -> bool:
        pool = self._plan.next_pool()
        if pool is None:
            return True  # nothing to retry on; can_retry says no
        if pool.budget.try_spend():
            return True
        self._metrics.retry_budget_exhausted.labels(pool.name).inc()
        return False
