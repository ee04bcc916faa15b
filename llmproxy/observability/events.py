"""State changes of backends, made visible: one log line and one metric each.

The pool and the health checker report here; nothing here decides anything.
"""

from __future__ import annotations

import logging

from llmproxy.health.outlier import Ejection
from llmproxy.observability.metrics import Metrics
from llmproxy.resilience.breaker import BreakerState

log = logging.getLogger("llmproxy.events")


class Events:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def health_changed(self, pool: str, backend: str, healthy: bool, reason: str) -> None:
        self._m.health_transitions.labels(pool, backend, "up" if healthy else "down").inc()
        if healthy:
            log.info("backend %s/%s is healthy again (%s)", pool, backend, reason)
        else:
            log.warning("backend %s/%s is unhealthy: %s", pool, backend, reason)

    def health_probe(self, pool: str, backend: str, passed: bool) -> None:
        self._m.health_checks.labels(pool, backend, "pass" if passed else "fail").inc()

    def breaker_changed(
        self, pool: str, backend: str, old: BreakerState, new: BreakerState
    ) -> None:
        self._m.breaker_transitions.labels(pool, backend, new.value).inc()
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "breaker of %s/%s: %s -> %s", pool, backend, old.value, new.value)

    def ejected(self, pool: str, ejection: Ejection) -> None:
        self._m.ejections.labels(pool, ejection.name).inc()
        log.warning(
            "backend %s/%s ejected until t=%.1f (ejection #%d): %s",
            pool, ejection.name, ejection.until, ejection.count, ejection.reason,
        )  # fmt: skip
