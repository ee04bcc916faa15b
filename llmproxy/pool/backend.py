"""Run-time state of one backend (an upstream replica).

A ``Backend`` is owned by its :class:`~llmproxy.pool.pool.Pool`; the health
checker, the outlier detector and the forwarder change it only through the
pool. Its ``name`` is stable across reloads, so a backend that stays in the
config keeps this object, and with it its in-flight count and history.
"""

from __future__ import annotations

from yarl import URL

from llmproxy.config.schema import BackendConfig


class Backend:
    __slots__ = (
        "_prefix",
        "base_url",
        "config",
        "draining",
        "healthy",
        "in_flight",
        "name",
        "weight",
    )

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.base_url = URL(config.url)
        self._prefix = config.url.rstrip("/")
        self.weight = config.weight
        #: Requests sent to this backend whose response has not ended.
        self.in_flight = 0
        #: Set by the active health checker; a new backend is presumed healthy
        #: until the checker says otherwise.
        self.healthy = True
        #: Takes no new requests; in-flight ones finish.
        self.draining = False

    @property
    def effective_weight(self) -> float:
        return self.weight

    @property
    def eligible(self) -> bool:
        return self.healthy and not self.draining

    def url_for(self, path_qs: str) -> URL:
        """The upstream URL for the client's raw (still encoded) path and query.

        A base URL with a path (``http://host/prefix``) prefixes the client's path.
        """
        return URL(self._prefix + path_qs, encoded=True)

    def __repr__(self) -> str:
        return f"<Backend {self.name} in_flight={self.in_flight} healthy={self.healthy}>"
