"""Run-time state of one backend (an upstream replica).

A ``Backend`` is owned by its :class:`~llmproxy.pool.pool.Pool`; the health
checker, the outlier detector, the breaker and the forwarder change it only
through the pool. A backend that stays in the config across a reload keeps
this object, and with it its in-flight count, breaker, health and history.
"""

from __future__ import annotations

from yarl import URL

from llmproxy.config.schema import BackendConfig
from llmproxy.health.slow_start import slow_start_factor
from llmproxy.resilience.breaker import Breaker
from llmproxy.upstream.h1 import Origin

#: A failing backend keeps at least this share of its weight, so it still sees
#: the odd request and its success rate can recover.
MIN_SUCCESS_FACTOR = 0.05
#: Weight of the newest outcome in the smoothed success rate.
SUCCESS_ALPHA = 0.2


class Backend:
    __slots__ = (
        "_prefix",
        "base_url",
        "breaker",
        "config",
        "draining",
        "effective_weight",
        "ejected_until",
        "health_detail",
        "healthy",
        "in_flight",
        "last_failure_at",
        "latency_factor",
        "name",
        "origin",
        "path_prefix",
        "ramp_from",
        "ramp_until",
        "success_rate",
        "weight",
    )

    def __init__(self, config: BackendConfig, breaker: Breaker) -> None:
        self.config = config
        self.name = config.name
        self.base_url = URL(config.url)
        self._prefix = config.url.rstrip("/")
        #: Where the lean upstream client connects, and the base URL's path
        #: that goes before the client's own path.
        self.origin = Origin.of(self.base_url)
        self.path_prefix = self.base_url.raw_path.rstrip("/")
        self.weight = config.weight
        self.breaker = breaker
        #: Requests sent to this backend whose response has not ended.
        self.in_flight = 0
        #: Set by the active health checker; presumed healthy until it says
        #: otherwise, so a gateway serves from the moment it starts.
        self.healthy = True
        self.health_detail = ""
        #: Takes no new requests; in-flight ones finish.
        self.draining = False
        #: Loop time until which the outlier detector keeps it out (0: not ejected).
        self.ejected_until = 0.0
        #: Loop time of the last failed request (for panic routing); 0: never.
        self.last_failure_at = 0.0
        #: Cut below 1 by the outlier detector while its latency is an outlier.
        self.latency_factor = 1.0
        #: Smoothed share of recent attempts that succeeded (1 = all). A replica
        #: that fails fast looks idle to least-connections; this keeps it from
        #: drawing the traffic it fails, long before it is ejected.
        self.success_rate = 1.0
        #: Slow start: the weight ramps up between these loop times.
        self.ramp_from = 0.0
        self.ramp_until = 0.0
        #: What balancers read: weight x latency factor x success factor x
        #: slow-start ramp; > 0.
        #: Kept as a plain attribute, refreshed by the pool, so a pick is cheap.
        self.effective_weight = self.weight

    def start_ramp(self, now: float, window_s: float) -> None:
        """It joined or came back: ramp its weight up over ``window_s``."""
        if window_s > 0:
            self.ramp_from = now
            self.ramp_until = now + window_s
        self.refresh_weight(now)

    def refresh_weight(self, now: float) -> None:
        w = self.weight * self.latency_factor * max(MIN_SUCCESS_FACTOR, self.success_rate**2)
        if now < self.ramp_until:
            w *= slow_start_factor(now - self.ramp_from, self.ramp_until - self.ramp_from)
        self.effective_weight = w

    def observe_outcome(self, ok: bool, now: float) -> None:
        self.success_rate += SUCCESS_ALPHA * ((1.0 if ok else 0.0) - self.success_rate)
        self.refresh_weight(now)

    def available(self, now: float) -> bool:
        """May take a new request now (the breaker's probe limit included)."""
        return (
            self.healthy
            and not self.draining
            and now >= self.ejected_until
            and self.breaker.admits()
        )

    @property
    def eligible(self) -> bool:
        """Healthy and not draining (the view of the health gauge and /readyz)."""
        return self.healthy and not self.draining

    def target_for(self, path_qs: str) -> str:
        """The request target for the client's raw (still encoded) path and query."""
        return self.path_prefix + path_qs

    def url_for(self, path_qs: str) -> URL:
        """The upstream URL for the client's raw (still encoded) path and query."""
        return URL(self._prefix + path_qs, encoded=True)

    def __repr__(self) -> str:
        return f"<Backend {self.name} in_flight={self.in_flight} healthy={self.healthy}>"
