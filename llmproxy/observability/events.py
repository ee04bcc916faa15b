"""State changes of backends, made visible: one log line and one metric each.

The pool and the health checker report here; nothing here decides anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from llmproxy.health.outlier import Ejection
from llmproxy.observability.metrics import Metrics
from llmproxy.resilience.breaker import BreakerState

log = logging.getLogger("llmproxy.events")


class Events:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        #: Called with (pool, backend, reason) when this instance finds a
        #: backend down (unhealthy, breaker open, ejected): cluster news.
        self.on_down: list[Callable[[str, str, str], None]] = []

    def _down(self, pool: str, backend: str, reason: str) -> None:
        for listener in self.on_down:
            listener(pool, backend, reason)

    def health_changed(self, pool: str, backend: str, healthy: bool, reason: str) -> None:
        self._m.health_transitions.labels(pool, backend, "up" if healthy else "down").inc()
        if healthy:
            log.info("backend %s/%s is healthy again (%s)", pool, backend, reason)
        else:
            log.warning("backend %s/%s is unhealthy: %s", pool, backend, reason)
            self._down(pool, backend, f"unhealthy: {reason}")

    def health_probe(self, pool: str, backend: str, passed: bool) -> None:
        self._m.health_checks.labels(pool, backend, "pass" if passed else "fail").inc()

    def breaker_changed(
        self, pool: str, backend: str, old: BreakerState, new: BreakerState
    ) -> None:
        self._m.breaker_transitions.labels(pool, backend, new.value).inc()
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "breaker of %s/%s: %s -> %s", pool, backend, old.value, new.value)
        if new is BreakerState.OPEN:
            self._down(pool, backend, "breaker open")

    def ejected(self, pool: str, ejection: Ejection) -> None:
        self._m.ejections.labels(pool, ejection.name).inc()
        log.warning(
            "backend %s/%s ejected until t=%.1f (ejection #%d): %s",
            pool, ejection.name, ejection.until, ejection.count, ejection.reason,
        )  # fmt: skip
        self._down(pool, ejection.name, f"ejected: {ejection.reason}")
