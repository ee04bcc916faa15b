"""The state one gateway process shares between its listeners, and its
lifecycle: start, reload, drain a backend, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from llmproxy.config import ConfigError, load_config
from llmproxy.config.schema import Config, HealthConfig
from llmproxy.health.checker import HealthChecker
from llmproxy.observability.events import Events
from llmproxy.observability.metrics import Metrics
from llmproxy.pool.backend import Backend
from llmproxy.runtime import Runtime
from llmproxy.upstream.forwarder import Forwarder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReloadStatus:
    ok: bool = True
    at: float | None = None
    errors: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rng = rng if rng is not None else random.Random()
        self.metrics = metrics if metrics is not None else Metrics()
        self.events = Events(self.metrics)
        self.clock = clock
        self.runtime = Runtime.build(config, rng=self.rng, clock=clock, events=self.events)
        #: Set on shutdown: /readyz turns 503 so load balancers stop sending.
        self.draining = False
        self.last_reload = ReloadStatus()
        self._reload_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._checkers: dict[str, tuple[HealthConfig, asyncio.Task[None]]] = {}
        self.forwarder: Forwarder | None = None
        self.metrics.register_runtime(lambda: self.runtime)

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def ready(self) -> bool:
        return not self.draining and self.runtime.ready

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # per-backend concurrency is the balancer's business
                keepalive_timeout=60,
                ttl_dns_cache=10,
            ),
            auto_decompress=False,  # bytes pass through as the replica sent them
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.forwarder = Forwarder(
            session=self._session,
            metrics=self.metrics,
            rng=self.rng,
            runtime=lambda: self.runtime,
            max_body_bytes=self.config.server.max_body_bytes,
        )
        self._sync_checkers()

    async def close(self) -> None:
        for _, task in self._checkers.values():
            task.cancel()
        for _, task in self._checkers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._checkers.clear()
        for s in (self._session, self._health_session):
            if s is not None:
                await s.close()
        self._session = self._health_session = None

    def _sync_checkers(self) -> None:
        """One health checker task per pool; restarted when its settings change."""
        assert self._health_session is not None
        pools = self.runtime.pools
        for name in list(self._checkers):
            cfg, task = self._checkers[name]
            pool = pools.get(name)
            if pool is None or pool.config.health != cfg:
                task.cancel()
                del self._checkers[name]
        for name, pool in pools.items():
            if name in self._checkers or not pool.config.health.enabled:
                continue
            checker = HealthChecker(
                targets=lambda name=name: self._pool_backends(name),  # type: ignore[misc]
                cfg=pool.config.health,
                session=self._health_session,
                rng=self.rng,
                on_result=lambda b, ok, _d, name=name: self.events.health_probe(name, b, ok),  # type: ignore[misc]
                on_transition=lambda b, ok, why, name=name: self._health_changed(name, b, ok, why),  # type: ignore[misc]
                clock=self.clock,
            )
            task = asyncio.create_task(checker.run(), name=f"health:{name}")
            self._checkers[name] = (pool.config.health, task)

    def _pool_backends(self, pool: str) -> list[Backend]:
        p = self.runtime.pools.get(pool)
        return p.backends if p is not None else []

    def _health_changed(self, pool: str, backend: str, healthy: bool, reason: str) -> None:
        p = self.runtime.pools.get(pool)
        if p is not None:
            p.set_health(backend, healthy, reason)

    # -- operator actions --------------------------------------------------------

    def set_draining(self, pool: str, backend: str, draining: bool) -> Backend:
        p = self.runtime.pools.get(pool)
        b = p.get(backend) if p is not None else None
        if b is None:
            raise KeyError(f"no backend '{backend}' in pool '{pool}'")
        if b.draining != draining:
            b.draining = draining
            if not draining and p is not None:
                b.start_ramp(self.clock(), p.config.slow_start_s)
            log.warning("backend %s/%s %s", pool, backend, "draining" if draining else "undrained")
        return b

    async def reload(self) -> ReloadStatus:
        """Re-read the config file; keep running on the old one if it is invalid."""
        async with self._reload_lock:
            source = self.config.source
            status = ReloadStatus(at=time.time())
            if source is None:
                status.ok, status.errors = False, ["config was not loaded from a file"]
            else:
                try:
                    config = await asyncio.to_thread(load_config, source)
                except ConfigError as exc:
                    status.ok, status.errors = False, list(exc.errors)
                else:
                    status.changes = self._swap(config)
            self.last_reload = status
            self.metrics.config_reloads.labels("success" if status.ok else "error").inc()
            self.metrics.config_last_reload_ok.set(1 if status.ok else 0)
            if status.ok:
                log.warning("config reloaded from %s: %s", source, "; ".join(status.changes))
            else:
                log.error(
                    "config reload from %s rejected, still running the previous config:\n%s",
                    source,
                    "\n".join(status.errors),
                )
            return status

    def _swap(self, config: Config) -> list[str]:
        old = self.runtime
        new = Runtime.build(
            config, rng=self.rng, clock=self.clock, events=self.events, previous=old
        )
        changes = []
        for name, pool in old.pools.items():
            if name not in new.pools:
                for b in pool.backends:
                    b.draining = True
                changes.append(f"pool {name} removed (draining)")
        for name, pool in new.pools.items():
            before = {b.name for b in old.pools[name].backends} if name in old.pools else set()
            after = {b.name for b in pool.backends}
            if name not in old.pools:
                changes.append(f"pool {name} added")
            changes += [f"backend {name}/{b} added" for b in sorted(after - before)]
            changes += [f"backend {name}/{b} removed (draining)" for b in sorted(before - after)]
        self.runtime = new
        self._sync_checkers()
        return changes or ["no backend changes"]

    # -- shutdown ----------------------------------------------------------------

    async def drain_requests(self, timeout_s: float) -> None:
        """Wait for in-flight requests to finish, up to ``timeout_s``; then
        end the rest (streams get the SSE error event)."""
        self.draining = True
        if self.forwarder is None:
            return
        fw = self.forwarder
        log.info("draining %d in-flight request(s), up to %.1fs", fw.active_count, timeout_s)
        if not await fw.wait_idle(timeout_s):
            log.warning("drain timeout: ending %d request(s)", fw.active_count)
            await fw.abort_all("the gateway is shutting down")

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        assert self.forwarder is not None, "Gateway.start() was not awaited"
        return await self.forwarder.handle(request)
