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
    request: web.Request
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
    attempts, never on a backend already tried while an untried eligible one
    exists. A pool with no eligible backend is skipped (route fallback); in
    panic mode it yields the backend that failed least recently instead.
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
                    return self._take(pool, backend, permit=True)
                if self.in_pool == 0:
                    if pool.config.panic_mode and (panic := pool.panic_pick()) is not None:
                        self.metrics.no_backend.labels(pool.name, "panic").inc()
                        return self._take(pool, panic, permit=False)
                    self.metrics.no_backend.labels(pool.name, "skipped").inc()
            self.index += 1
            self.in_pool = 0
            self.tried = []
        return None

    def has_next(self) -> bool:
        """Whether another attempt could be made (cheap check, no permit taken)."""
        now = self.primary.clock()
        for i in range(self.index, len(self.pools)):
            pool = self.pools[i]
            used = self.in_pool if i == self.index else 0
            if used < pool.config.retry.attempts and (
                pool.candidates(now) or (used == 0 and pool.config.panic_mode)
            ):
                return True
        return False

    def _take(self, pool: Pool, backend: Backend, *, permit: bool) -> tuple[Pool, Backend, bool]:
        self.in_pool += 1
        self.tried.append(backend)
        return pool, backend, permit
