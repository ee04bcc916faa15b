"""A pool (Envoy's cluster): backends, their balancer, and the one notion of
"eligible backend" that every failure-handling component feeds.

Eligible = healthy (active checks) ∧ not ejected (outlier detection) ∧ the
breaker admits ∧ not draining. The forwarder reports each attempt's outcome
here; the pool passes it to the breaker and the outlier detector, and turns
their verdicts into backend state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol

from llmproxy.balancing.base import Balancer, NoCandidatesError, PickContext
from llmproxy.balancing.registry import make_balancer
from llmproxy.config.schema import PoolConfig
from llmproxy.health.outlier import Ejection, OutlierDetector
from llmproxy.pool.backend import Backend
from llmproxy.resilience.breaker import Breaker, BreakerState
from llmproxy.resilience.budget import RetryBudget


class PoolEvents(Protocol):
    """Where state changes go: logs and metrics (see observability.events)."""

    def health_changed(self, pool: str, backend: str, healthy: bool, reason: str) -> None: ...

    def breaker_changed(
        self, pool: str, backend: str, old: BreakerState, new: BreakerState
    ) -> None: ...

    def ejected(self, pool: str, ejection: Ejection) -> None: ...


class Pool:
    def __init__(
        self,
        config: PoolConfig,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        events: PoolEvents,
        previous: Pool | None = None,
        running: bool = False,
    ) -> None:
        """Build a pool; with ``previous`` (a reload), backends with the same
        name and URL keep their state, and so do the budget and detector.

        ``running``: the gateway is already serving (a reload or discovery), so
        new backends wait for their health checks and start in slow start.
        """
        self.config = config
        self.name = config.name
        self.clock = clock
        self._events = events
        self.balancer: Balancer = make_balancer(config.balancer, rng)
        now = clock()
        old = {(b.name, b.config.url): b for b in previous.backends} if previous else {}
        self.backends: list[Backend] = []
        for bc in config.backends:
            backend = old.pop((bc.name, bc.url), None)
            if backend is None:
                backend = Backend(bc, self._make_breaker(bc.name))
                if running:  # joined by a reload (or discovery)
                    backend.start_ramp(now, config.slow_start_s)  # cold cache
                    if config.health.enabled:  # no traffic before it passes checks
                        backend.healthy = False
                        backend.health_detail = "awaiting its first health checks"
            else:
                backend.config = bc
                backend.weight = bc.weight
                backend.refresh_weight(now)
            self.backends.append(backend)
        #: Backends a reload removed: drained (no new requests), not cut.
        self.removed = list(old.values())
        for b in self.removed:
            b.draining = True
        self._by_name = {b.name: b for b in self.backends}
        names = list(self._by_name)
        self.outlier: OutlierDetector
        if previous is not None:
            self.outlier = previous.outlier
            self.outlier.set_backends(names, config.outlier)
        else:
            self.outlier = OutlierDetector(config.outlier, names)
        r = config.retry
        self.budget: RetryBudget
        if previous is not None and previous.config.retry == r:
            self.budget = previous.budget
        else:
            self.budget = RetryBudget(r.budget_ratio, r.min_retries, r.budget_window_s, clock)

    def _make_breaker(self, name: str) -> Breaker:
        def changed(_: str, old: BreakerState, new: BreakerState) -> None:
            self._events.breaker_changed(self.name, name, old, new)
            if new is BreakerState.CLOSED:
                b = self._by_name.get(name)
                if b is not None:
                    b.start_ramp(self.clock(), self.config.slow_start_s)

        return Breaker(f"{self.name}/{name}", self.config.breaker, self.clock, changed)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    # -- choosing ------------------------------------------------------------

    def candidates(self, now: float) -> list[Backend]:
        """Backends that may take a new request now."""
        out = []
        for b in self.backends:
            if b.ejected_until and now >= b.ejected_until:
                b.ejected_until = 0.0  # ejection over: back, in slow start
                b.start_ramp(now, self.config.slow_start_s)
            elif b.ramp_until:
                b.refresh_weight(now)
                if now >= b.ramp_until:
                    b.ramp_until = 0.0  # ramp done: full weight
            if b.available(now):
                out.append(b)
        return out

    @property
    def has_eligible(self) -> bool:
        now = self.clock()
        return any(b.available(now) for b in self.backends)

    def acquire(self, ctx: PickContext, exclude: Collection[Backend] = ()) -> Backend | None:
        """Choose a backend for one attempt and take its breaker permit.

        Backends already tried for this request (``exclude``) are passed over
        while an untried eligible one exists (Envoy's retry host predicate).
        ``None`` when no backend is eligible (the caller refuses or panics).
        """
        cands: Sequence[Backend] = self.candidates(self.clock())
        if exclude and cands:
            untried = [b for b in cands if b not in exclude]
            if untried:
                cands = untried
        while cands:
            try:
                backend = self.balancer.pick(cands, ctx)
            except NoCandidatesError:
                return None
            if backend.breaker.acquire():
                return backend
            # A half-open breaker's last probe slot went to another request.
            cands = [b for b in cands if b is not backend]
        return None

    def panic_pick(self) -> Backend | None:
        """Panic routing: with nothing eligible, the backend that failed least
        recently (never-failed first), ignoring health, breaker and ejection."""
        live = [b for b in self.backends if not b.draining]
        if not live:
            return None
        return min(live, key=lambda b: (b.last_failure_at, b.in_flight))

    def retry_after_s(self) -> int:
        """A client's best wait before a backend may be eligible again."""
        now = self.clock()
        waits = [b.ejected_until - now for b in self.backends if b.ejected_until > now]
        waits.append(self.config.health.interval_s)
        return max(1, min(30, round(min(waits))))

    # -- outcomes -------------------------------------------------------------

    def record_success(self, backend: Backend, ttfb_s: float | None, *, permit: bool) -> None:
        """``permit``: the attempt held a breaker permit (not a panic pick)."""
        if permit:
            backend.breaker.record_success()
        now = self.clock()
        self.outlier.on_success(backend.name, now, ttfb_s)
        backend.latency_factor = self.outlier.weight_factor(backend.name)
        backend.observe_outcome(True, now)

    def record_failure(self, backend: Backend, *, permit: bool) -> None:
        now = self.clock()
        backend.last_failure_at = now
        backend.observe_outcome(False, now)
        if permit:
            backend.breaker.record_failure()
        ejection = self.outlier.on_failure(backend.name, now)
        if ejection is not None:
            backend.ejected_until = ejection.until
            self._events.ejected(self.name, ejection)

    def record_neutral(self, backend: Backend, *, permit: bool) -> None:
        """The attempt ended without a verdict on the backend (client left, 429)."""
        if permit:
            backend.breaker.release()

    def set_health(self, name: str, healthy: bool, reason: str) -> None:
        b = self._by_name.get(name)
        if b is None or b.healthy == healthy:
            return
        b.healthy = healthy
        b.health_detail = reason
        if healthy:
            b.start_ramp(self.clock(), self.config.slow_start_s)
        self._events.health_changed(self.name, name, healthy, reason)
