"""Run-time traffic weights: operator overrides and automatic canaries.

A route's split comes from the config; an operator may change its weights
through the admin API, and a route with a ``canary:`` has its canary weight
driven by :class:`~llmproxy.policy.canary.CanaryAnalyzer` (rollback at once
when the canary is worse, progressive promotion while it is not). Changes
hold until the next change or the next config reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmproxy.config.schema import Config, RouteConfig, SplitTarget
from llmproxy.observability.metrics import Metrics
from llmproxy.policy.canary import CanaryAnalyzer, Verdict, apply_weight, canary_percent
from llmproxy.pool.pool import Pool
from llmproxy.upstream.exchange import Exchange

log = logging.getLogger("llmproxy.traffic")

#: How often canaries are evaluated, in seconds.
EVALUATE_EVERY_S = 0.5


class TrafficError(ValueError):
    """An operator asked for weights that cannot apply to the route."""


class Traffic:
    def __init__(self, config: Config, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._clock = clock
        self._routes: dict[str, RouteConfig] = {}
        self._overrides: dict[str, tuple[SplitTarget, ...]] = {}
        self._canaries: dict[str, CanaryAnalyzer] = {}
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """A (re)load: weights go back to the config's; canaries restart."""
        self._routes = {r.name: r for r in config.routes}
        self._overrides = {}
        self._canaries = {}
        for r in config.routes:
            if r.canary is not None and r.canary.enabled:
                # Progressive steps start at the first step; otherwise the
                # canary keeps the weight the config's split gives it.
                start = None if r.canary.steps else canary_percent(r.split, r.canary.canary_pool)
                self._canaries[r.name] = CanaryAnalyzer(r.canary, self._clock, initial_weight=start)
                self._apply(r.name, self._canaries[r.name].weight)
            self._publish(r.name)

    # -- request path ------------------------------------------------------------

    def split(self, route: RouteConfig) -> Sequence[SplitTarget]:
        return self._overrides.get(route.name, route.split)

    def on_attempt(
        self, ex: Exchange, pool: Pool, verdict: bool | None, ttfb: float | None
    ) -> None:
        if verdict is None:
            return
        analyzer = self._canaries.get(ex.route)
        if analyzer is not None:
            analyzer.record(pool.name, verdict, ttfb if verdict else None, self._clock())

    # -- operator actions --------------------------------------------------------

    def set_weights(self, route: str, weights: Mapping[str, float]) -> tuple[SplitTarget, ...]:
        r = self._route(route)
        known = {t.pool for t in r.split}
        unknown = set(weights) - known
        if unknown:
            raise TrafficError(f"pools not in route '{route}': {', '.join(sorted(unknown))}")
        # bool is an int; NaN and Infinity (Python's json reads both) would
        # break every request of the route (choose_pool: 500, or all traffic
        # on the wrong pool).
        if any(
            isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < math.inf
            for w in weights.values()
        ):
            raise TrafficError("weights must be finite numbers >= 0")
        split = tuple(SplitTarget(t.pool, float(weights.get(t.pool, 0.0))) for t in r.split)
        if not any(t.weight > 0 for t in split):
            raise TrafficError("at least one pool needs a weight above 0")
        self._overrides[route] = split
        analyzer = self._canaries.get(route)
        if analyzer is not None:
            analyzer.reset(canary_percent(split, analyzer_pool(r)))
        log.warning("route %s weights set by operator: %s", route, _show(split))
        self._publish(route)
        return split

    def promote(self, route: str) -> Verdict:
        return self._act(route, lambda a: a.promote(), "promoted by operator")

    def rollback(self, route: str) -> Verdict:
        verdict = self._act(route, lambda a: a.rollback("rolled back by operator"), "rollback")
        self._metrics.canary_rollbacks.labels(route).inc()
        return verdict

    def _act(self, route: str, action: Callable[[CanaryAnalyzer], Verdict], what: str) -> Verdict:
        self._route(route)
        analyzer = self._canaries.get(route)
        if analyzer is None:
            raise TrafficError(f"route '{route}' has no canary")
        verdict = action(analyzer)
        self._apply(route, verdict.weight)
        log.warning("route %s canary %s: weight %.1f%%", route, what, verdict.weight)
        return verdict

    # -- automatic analysis ----------------------------------------------------------

    def evaluate(self) -> None:
        now = self._clock()
        for route, analyzer in self._canaries.items():
            verdict = analyzer.evaluate(now)
            if not verdict.changed:
                continue
            self._apply(route, verdict.weight)
            if verdict.state == "rolled_back":
                self._metrics.canary_rollbacks.labels(route).inc()
                log.error("route %s canary rolled back: %s", route, verdict.reason)
            else:
                log.warning(
                    "route %s canary %s: weight %.1f%% (%s)",
                    route, verdict.state, verdict.weight, verdict.reason,
                )  # fmt: skip

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVALUATE_EVERY_S)
            try:
                self.evaluate()
            except Exception:
                log.exception("canary evaluation failed")

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        out: dict[str, Any] = {}
        for name, r in self._routes.items():
            entry: dict[str, Any] = {
                "split": [{"pool": t.pool, "weight": t.weight} for t in self.split(r)],
                "overridden": name in self._overrides,
            }
            analyzer = self._canaries.get(name)
            if analyzer is not None:
                entry["canary"] = dataclasses.asdict(analyzer.snapshot(now))
            out[name] = entry
        return out

    # -- helpers -----------------------------------------------------------------------

    def _route(self, name: str) -> RouteConfig:
        r = self._routes.get(name)
        if r is None:
            raise KeyError(f"no route '{name}'")
        return r

    def _apply(self, route: str, canary_weight: float) -> None:
        r = self._routes[route]
        assert r.canary is not None
        self._overrides[route] = apply_weight(r.split, r.canary.canary_pool, canary_weight)
        self._publish(route)

    def _publish(self, route: str) -> None:
        for t in self.split(self._routes[route]):
            self._metrics.canary_weight.labels(route, t.pool).set(t.weight)


def analyzer_pool(route: RouteConfig) -> str:
    assert route.canary is not None
    return route.canary.canary_pool


def _show(split: Sequence[SplitTarget]) -> str:
    return ", ".join(f"{t.pool}={t.weight:g}" for t in split)
