"""The state one gateway process shares between its listeners, and its
lifecycle: start, reload, drain a backend, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from llmproxy.cluster.news import BackendNews, ClusterNews, apply_news
from llmproxy.config import ConfigError, load_config
from llmproxy.config.schema import BackendConfig, Config
from llmproxy.discovery.dns import Resolver
from llmproxy.discovery.manager import DiscoveryManager
from llmproxy.health.supervisor import HealthSupervisor
from llmproxy.observability.access_log import AccessEntry, AccessLog
from llmproxy.observability.events import Events
from llmproxy.observability.metrics import NONE, Metrics
from llmproxy.observability.saturation import SaturationScraper
from llmproxy.observability.tracing import Tracing
from llmproxy.policy.gate import GateKeeper
from llmproxy.policy.ratelimit import RateLimiter, build_store
from llmproxy.policy.traffic import Traffic
from llmproxy.pool.backend import Backend
from llmproxy.runtime import Runtime
from llmproxy.upstream.exchange import Exchange
from llmproxy.upstream.forwarder import Forwarder
from llmproxy.upstream.h1 import H1Client

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
        resolver: Resolver | None = None,
    ) -> None:
        """``resolver``: DNS for discovered pools (the system's by default)."""
        self.rng = rng if rng is not None else random.Random()
        self.metrics = metrics if metrics is not None else Metrics()
        self.events = Events(self.metrics)
        self.clock = clock
        self.runtime = Runtime.build(config, rng=self.rng, clock=clock, events=self.events)
        self.traffic = Traffic(config, self.metrics, clock)
        self.tracing = Tracing.from_config(config.tracing)
        self.access_log = AccessLog(config.access_log) if config.access_log.enabled else None
        self._log_prompts = self.access_log is not None and self.access_log.wants_prompt
        self.discovery = DiscoveryManager(self._discovered, self.rng, clock, resolver)
        #: Set on shutdown: /readyz turns 503 so load balancers stop sending.
        self.draining = False
        self.last_reload = ReloadStatus()
        self._reload_lock = asyncio.Lock()
        self._upstream: H1Client | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._health: HealthSupervisor | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._saturation_task: asyncio.Task[None] | None = None
        self._news: ClusterNews | None = None
        self.gate: GateKeeper | None = None
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
        config = self.config
        if any(p.discovery for p in config.pools.values()):
            await self.discovery.start(config)
            self.runtime = self._build(config, previous=None)
        # The request path's client: keep-alive pools, no connection limit
        # (per-backend concurrency is the balancer's business); bytes pass
        # through as the replica sent them. Health checks and scrapes keep
        # aiohttp's client, off the hot path.
        self._upstream = H1Client(keepalive_s=60)
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if self.access_log is not None:
            self.access_log.start()
        self.gate = self._make_gate(config)
        self.forwarder = Forwarder(
            client=self._upstream,
            metrics=self.metrics,
            rng=self.rng,
            runtime=lambda: self.runtime,
            max_body_bytes=config.server.max_body_bytes,
            gate=self.gate,
            trust_forwarded_for=config.server.trust_forwarded_for,
            splits=self.traffic.split,
            tracing=self.tracing,
            on_finish=(self._finished,),
            on_attempt=(self.traffic.on_attempt,),
            keep_bodies=self.access_log is not None and self.access_log.wants_prompt,
        )
        self._health = HealthSupervisor(
            lambda: self.runtime, self._health_session, self.rng, self.events, self.clock
        )
        self._health.sync()
        self._canary_task = asyncio.create_task(self.traffic.run(), name="canary-analysis")
        saturation = SaturationScraper(
            lambda: self.runtime.pools,
            self._health_session,
            asyncio.get_running_loop().time,
            lambda pool: self.runtime.pools[pool].config.autoscale,
        )
        saturation.register(self.metrics.registry)
        self._saturation_task = asyncio.create_task(saturation.run(), name="saturation")
        if config.cluster.enabled:
            self._news = ClusterNews(config.cluster, self._on_news)
            self.events.on_down.append(self._publish_down)
            await self._news.start()

    async def close(self) -> None:
        for task in (self._canary_task, self._saturation_task):
            if task is not None:
                task.cancel()
        if self._news is not None:
            await self._news.close()
        await self.discovery.stop()
        if self._health is not None:
            await self._health.close()
        if self.gate is not None:
            await self.gate.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self._health_session is not None:
            await self._health_session.close()
        self._upstream = self._health_session = None
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.stop)
        await asyncio.to_thread(self.tracing.shutdown)

    def _make_gate(self, config: Config) -> GateKeeper:
        limits = config.rate_limits
        wants_limits = bool(limits.rules) or any(
            k.requests_per_minute or k.tokens_per_minute or k.max_concurrent
            for k in config.auth.keys
        )
        limiter = None
        if wants_limits:
            limiter = RateLimiter(
                limits,
                build_store(limits, self.clock),
                clock=self.clock,
                on_store_error=self.metrics.ratelimit_store_errors.inc,
            )
        return GateKeeper(config, limiter, self.metrics)

    def _build(self, config: Config, previous: Runtime | None) -> Runtime:
        return Runtime.build(
            config,
            rng=self.rng,
            clock=self.clock,
            events=self.events,
            previous=previous,
            discovered=self.discovery.backends,
        )

    # -- the end of every request ------------------------------------------------

    def _finished(self, ex: Exchange, now: float) -> None:
        if ex.ticket is not None and self.gate is not None:
            self.gate.settle(ex, ex.ticket)  # type: ignore[arg-type]
        if self.access_log is not None:
            request = ex.request
            self.access_log.record(
                # By position, in the order of AccessEntry's fields: a third
                # of the cost of keywords, once per request.
                AccessEntry(
                    time.time() - (now - ex.started),
                    ex.request_id,
                    request.method,
                    request.raw_path,  # path: as sent, no decoding per request
                    None if ex.route is NONE else ex.route,
                    None if ex.pool is NONE else ex.pool,
                    None if ex.backend is NONE else ex.backend,
                    ex.attempts,
                    ex.status,
                    # ttfb_ms, duration_ms: rounded by the writer thread.
                    None if ex.ttfb_s is None else ex.ttfb_s * 1000,
                    (now - ex.started) * 1000,
                    ex.bytes_sent,
                    ex.prompt_tokens,
                    ex.completion_tokens,
                    ex.client_ip,
                    ex.api_key_name,
                    ex.stream,
                    ex.outcome,
                    ex.error,
                    _prompt(ex) if self._log_prompts else None,
                    ex.span.trace_id,
                )
            )

    # -- news from other gateway instances ---------------------------------------

    def _publish_down(self, pool: str, backend: str, reason: str) -> None:
        if self._news is not None:
            self._news.publish_nowait(self._news.news(pool, backend, "down", reason))

    def _on_news(self, news: BackendNews) -> None:
        p = self.runtime.pools.get(news.pool)
        if p is None or p.get(news.backend) is None:
            return
        hold_s = p.config.breaker.reset_timeout_s

        def eject(pool: str, backend: str, for_s: float) -> None:
            b = p.get(backend)
            if b is not None:
                b.ejected_until = max(b.ejected_until, self.clock() + for_s)
                log.warning(
                    "backend %s/%s held out for %.1fs: instance %s says %s",
                    pool, backend, for_s, news.instance, news.reason,
                )  # fmt: skip

        apply_news(news, time.time(), eject, hold_s)

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
                    await self.discovery.start(config)
                    status.changes = self._swap(config)
                    await self._new_gate(config)
                    self.traffic.apply_config(config)
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

    async def _new_gate(self, config: Config) -> None:
        """Keys and limits follow the reloaded config (a memory store starts
        afresh; a Redis store keeps its counts)."""
        old = self.gate
        self.gate = self._make_gate(config)
        if self.forwarder is not None:
            self.forwarder.gate = self.gate
        if old is not None:
            await old.close()

    def _discovered(self, pool: str, backends: tuple[BackendConfig, ...]) -> None:
        changes = self._swap(self.config)
        log.warning("pool %s: discovery changed the backends: %s", pool, "; ".join(changes))

    def _swap(self, config: Config) -> list[str]:
        old = self.runtime
        new = self._build(config, previous=old)
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
        if self._health is not None:
            self._health.sync()
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


def _prompt(ex: Exchange) -> str | None:
    """The request body as text, only when the config opts into prompt logging."""
    return ex.body.decode("utf-8", "replace") if ex.body else None
