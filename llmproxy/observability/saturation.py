"""Autoscaling signals per pool: how busy the replicas are, as Prometheus gauges.

Three sources, per pool whose ``autoscale.enabled`` is set:

* in flight -- requests this gateway instance has sent to each backend and
  not yet seen end (read from the pool at collection time);
* waiting / running / KV-cache usage -- scraped from each replica's own
  ``/metrics`` (vLLM's ``vllm:num_requests_waiting``,
  ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``; TGI's
  ``tgi_queue_size`` and ``tgi_batch_current_size`` and vLLM's older
  ``vllm:gpu_cache_usage_perc`` are read when those are absent) every
  ``scrape_interval_s``;
* desired replicas -- ``in_flight / target_in_flight_per_replica``.

Exported (by :class:`SaturationCollector`, computed at scrape time):

==========================================  =====================================
``llmproxy_pool_in_flight{pool}``           sum over the pool's backends
``llmproxy_pool_requests_waiting{pool}``    sum over backends with a fresh value
``llmproxy_pool_requests_running{pool}``    sum over backends with a fresh value
``llmproxy_pool_kv_cache_usage{pool}``      mean over backends with a fresh value (0..1)
``llmproxy_pool_desired_replicas{pool}``    in flight / target, NOT rounded
``llmproxy_backend_requests_waiting{...}``  per backend (``pool``, ``backend``), fresh only
``llmproxy_backend_scrape_stale{...}``      1 if the backend has no fresh value
==========================================  =====================================

Staleness. A failed scrape (refused, timed out, not 200, unparsable) keeps
the last value, which is dropped from the sums, and its backend marked stale
(``..._scrape_stale`` = 1), once it is older than ``stale_after_s``; a backend
never scraped successfully is stale from the start. A pool-level replica
gauge with no fresh backend behind it is absent rather than 0: an autoscaler
must not read "no queue" from "no data".

Aggregating over several gateway instances. In-flight counts are per
instance: the pool's total is ``sum by (pool)`` over instances, and so is the
desired replica count -- which is why it is not rounded here: rounding
(up) each instance's share and then summing would over-count by up to one
replica per instance; round once, after the sum (the HPA does). The replica
gauges (waiting, running, KV cache) are the replicas' own numbers, which every
instance scrapes alike: aggregate them with ``max`` or ``avg``, never ``sum``.

Only backends in ``pool.backends`` count; those a reload removed and that are
still draining their last requests do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from yarl import URL

from llmproxy.config.schema import AutoscaleConfig as AutoscaleConfig  # noqa: PLC0414 - re-export

log = logging.getLogger(__name__)

#: Replica metric names, preferred first (vLLM, then older vLLM or TGI).
WAITING = ("vllm:num_requests_waiting", "tgi_queue_size")
RUNNING = ("vllm:num_requests_running", "tgi_batch_current_size")
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_WANTED = frozenset(WAITING + RUNNING + KV_CACHE)

#: A replica's /metrics larger than this (bytes) is a failed scrape.
MAX_METRICS_BYTES = 8 * 1024 * 1024
#: Upper bound on one scrape (seconds); it is also never longer than the interval.
DEFAULT_SCRAPE_TIMEOUT_S = 2.0
#: The scrape loop looks for new or reconfigured pools at least this often (s).
IDLE_RECHECK_S = 1.0


class BackendView(Protocol):
    """What is read of a backend (the gateway's ``Backend`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def base_url(self) -> URL: ...
    @property
    def in_flight(self) -> int: ...


class PoolView(Protocol):
    """What is read of a pool (the gateway's ``Pool`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def backends(self) -> Sequence[BackendView]: ...


#: The autoscale settings of a pool, by name.
Settings = Callable[[str], AutoscaleConfig]


# -- parsing (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica's load, as its /metrics said. Counts are summed over the
    series of a metric (one per model or engine), the cache usage is their mean."""

    waiting: float
    running: float | None = None
    kv_cache_usage: float | None = None


def parse_replica_metrics(text: str) -> ReplicaLoad:
    """Read a replica's Prometheus text; ``ValueError`` if it is malformed or
    has no requests-waiting gauge (then the replica is not a vLLM/TGI server).

    Lines of other metrics are skipped before parsing: a vLLM server exposes
    hundreds of histogram lines that matter nothing here.
    """
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(_only_wanted(text)):
        for sample in family.samples:
            if sample.name in _WANTED and math.isfinite(sample.value):
                values.setdefault(sample.name, []).append(float(sample.value))

    def first(names: tuple[str, ...]) -> list[float] | None:
        return next((values[n] for n in names if n in values), None)

    waiting, running, kv = first(WAITING), first(RUNNING), first(KV_CACHE)
    if waiting is None:
        msg = f"no {WAITING[0]} in the metrics"
        raise ValueError(msg)
    return ReplicaLoad(
        waiting=sum(waiting),
        running=sum(running) if running is not None else None,
        kv_cache_usage=sum(kv) / len(kv) if kv is not None else None,
    )


def _only_wanted(text: str) -> str:
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            name = parts[2] if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") else ""
        else:
            head = line.split("{", 1)[0].split(None, 1)
            name = head[0] if head else ""
        if name in _WANTED:
            kept.append(line)
    return "\n".join(kept) + "\n"


# -- state and arithmetic (pure) -------------------------------------------------


def desired_replicas(in_flight: float, target_per_replica: float) -> float:
    """Replicas that would carry ``in_flight`` at the target; not rounded (see
    the module docstring: sums over gateway instances must stay exact)."""
    if target_per_replica <= 0:
        msg = f"target_in_flight_per_replica must be > 0, got {target_per_replica}"
        raise ValueError(msg)
    return in_flight / target_per_replica


@dataclass(frozen=True, slots=True)
class Sample:
    """A scraped load, the URL it came from, and when (clock seconds)."""

    load: ReplicaLoad
    url: str
    at: float


#: Latest sample per ``(pool, backend)``.
Samples = dict[tuple[str, str], Sample]


@dataclass(frozen=True, slots=True)
class BackendSaturation:
    name: str
    in_flight: int
    #: ``None`` when stale (or never scraped).
    load: ReplicaLoad | None

    @property
    def stale(self) -> bool:
        return self.load is None


@dataclass(frozen=True, slots=True)
class PoolSaturation:
    pool: str
    in_flight: int
    desired_replicas: float
    backends: tuple[BackendSaturation, ...]
    #: Over backends with a fresh value; ``None`` if there is none.
    waiting: float | None
    running: float | None
    kv_cache_usage: float | None


def fresh_load(
    sample: Sample | None, url: str, now: float, stale_after_s: float
) -> ReplicaLoad | None:
    """The sample's load if it is of this URL and at most ``stale_after_s`` old."""
    if sample is None or sample.url != url or now - sample.at > stale_after_s:
        return None
    return sample.load


def pool_saturation(
    pool: PoolView, cfg: AutoscaleConfig, samples: Mapping[tuple[str, str], Sample], now: float
) -> PoolSaturation:
    backends = tuple(
        BackendSaturation(
            b.name,
            b.in_flight,
            fresh_load(samples.get((pool.name, b.name)), str(b.base_url), now, cfg.stale_after_s),
        )
        for b in pool.backends
    )
    fresh = [b.load for b in backends if b.load is not None]
    running = [x.running for x in fresh if x.running is not None]
    kv = [x.kv_cache_usage for x in fresh if x.kv_cache_usage is not None]
    in_flight = sum(b.in_flight for b in backends)
    return PoolSaturation(
        pool=pool.name,
        in_flight=in_flight,
        desired_replicas=desired_replicas(in_flight, cfg.target_in_flight_per_replica),
        backends=backends,
        waiting=sum(x.waiting for x in fresh) if fresh else None,
        running=sum(running) if running else None,
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
    )


# -- export ---------------------------------------------------------------------


class SaturationCollector(Collector):
    """Computes the gauges at collection time from the pools and the samples."""

    def __init__(
        self,
        pools: Callable[[], Mapping[str, PoolView]],
        settings: Settings,
        samples: Mapping[tuple[str, str], Sample],
        clock: Callable[[], float],
    ) -> None:
        self._pools = pools
        self._settings = settings
        self._samples = samples
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        in_flight, waiting, running, kv, desired, b_waiting, b_stale = families
        now = self._clock()
        for pool in list(self._pools().values()):
            cfg = self._settings(pool.name)
            if not cfg.enabled:
                continue
            s = pool_saturation(pool, cfg, self._samples, now)
            name = s.pool
            in_flight.add_metric([name], s.in_flight)
            desired.add_metric([name], s.desired_replicas)
            for family, value in (
                (waiting, s.waiting),
                (running, s.running),
                (kv, s.kv_cache_usage),
            ):
                if value is not None:
                    family.add_metric([name], value)
            for b in s.backends:
                b_stale.add_metric([name, b.name], 1.0 if b.stale else 0.0)
                if b.load is not None:
                    b_waiting.add_metric([name, b.name], b.load.waiting)
        yield from families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        def pool(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["pool"])

        def backend(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["pool", "backend"])

        return [
            pool(
                "llmproxy_pool_in_flight",
                "Requests this instance has in flight to the pool (sum over instances).",
            ),
            pool(
                "llmproxy_pool_requests_waiting",
                "Requests queued in the pool's replicas, from their /metrics"
                " (the same for every instance: aggregate with max, not sum).",
            ),
            pool(
                "llmproxy_pool_requests_running",
                "Requests generating in the pool's replicas, from their /metrics"
                " (the same for every instance: aggregate with max, not sum).",
            ),
            pool(
                "llmproxy_pool_kv_cache_usage",
                "Mean KV-cache usage (0..1) of the pool's replicas with a fresh scrape.",
            ),
            pool(
                "llmproxy_pool_desired_replicas",
                "In-flight requests / target per replica, unrounded (sum over instances,"
                " then round up).",
            ),
            backend(
                "llmproxy_backend_requests_waiting",
                "Requests queued in one replica, from its /metrics (fresh values only).",
            ),
            backend(
                "llmproxy_backend_scrape_stale",
                "1 if the replica's /metrics has not been scraped successfully"
                " within the pool's stale_after_s.",
            ),
        ]


# -- scraping -----------------------------------------------------------------------


class SaturationScraper:
    """Scrapes every replica of every autoscaled pool, each pool on its own
    interval, from one loop (:meth:`run`); :meth:`register` exports the result.

    ``clock`` is monotonic seconds, the clock ``asyncio.sleep`` runs on (e.g.
    ``loop.time``); ``session`` is the gateway's shared client session.
    Scrapes of one pool run concurrently, each bounded by ``timeout_s`` (and by
    the pool's interval); a pool whose previous round has not ended is not
    scraped again until it has.
    """

    def __init__(
        self,
        pools: Callable[[], Mapping[str, PoolView]],
        session: aiohttp.ClientSession,
        clock: Callable[[], float],
        settings: Settings,
        *,
        timeout_s: float = DEFAULT_SCRAPE_TIMEOUT_S,
    ) -> None:
        self._pools = pools
        self._session = session
        self._clock = clock
        self._settings = settings
        self._timeout_s = timeout_s
        self.samples: Samples = {}
        #: Backends whose latest scrape failed (logged once per streak).
        self._failing: set[tuple[str, str]] = set()
        self._rounds: dict[str, asyncio.Task[None]] = {}
        self._round_ended = asyncio.Event()
        self.collector = SaturationCollector(pools, settings, self.samples, clock)

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.collector)

    async def run(self) -> None:
        """Scrape until cancelled; rounds in progress are cancelled with it."""
        due: dict[str, float] = {}
        self._round_ended = asyncio.Event()
        try:
            while True:
                now = self._clock()
                pools = self._pools()
                wake = now + IDLE_RECHECK_S
                for pool in pools.values():
                    name = pool.name
                    cfg = self._settings(name)
                    if not cfg.enabled:
                        due.pop(name, None)
                        continue
                    at = due.setdefault(name, now)
                    if name in self._rounds:
                        continue  # the end of the round wakes the loop
                    if at <= now:
                        at = due[name] = now + cfg.scrape_interval_s
                        self._start_round(pool, cfg)
                    wake = min(wake, at)
                for gone in due.keys() - {p.name for p in pools.values()}:
                    del due[gone]
                self._prune(pools)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, wake - self._clock())):
                        await self._round_ended.wait()
                self._round_ended.clear()
        finally:
            rounds = list(self._rounds.values())
            for task in rounds:
                task.cancel()
            for task in rounds:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _start_round(self, pool: PoolView, cfg: AutoscaleConfig) -> None:
        task = asyncio.create_task(self.scrape_pool(pool, cfg), name=f"saturation:{pool.name}")
        self._rounds[pool.name] = task
        task.add_done_callback(lambda t: self._round_done(pool.name, t))

    def _round_done(self, pool: str, task: asyncio.Task[None]) -> None:
        if self._rounds.get(pool) is task:
            del self._rounds[pool]
            self._round_ended.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("saturation: scrape round of pool %s failed", pool, exc_info=exc)

    def _prune(self, pools: Mapping[str, PoolView]) -> None:
        """Forget backends that left (discovery, reloads): memory stays bounded."""
        live = {(p.name, b.name) for p in pools.values() for b in p.backends}
        for key in self.samples.keys() - live:
            del self.samples[key]
        self._failing &= live

    async def scrape_pool(self, pool: PoolView, cfg: AutoscaleConfig) -> None:
        """One round: scrape every backend of ``pool`` at once."""
        limit_s = min(self._timeout_s, cfg.scrape_interval_s)
        backends = list(pool.backends)
        results = await asyncio.gather(
            *(self._scrape(pool.name, b, cfg.metrics_path, limit_s) for b in backends),
            return_exceptions=True,
        )
        for backend, result in zip(backends, results, strict=True):
            if isinstance(result, BaseException):  # a bug, not a replica's fault
                log.error(
                    "saturation: scraping %s/%s raised", pool.name, backend.name, exc_info=result
                )

    async def _scrape(self, pool: str, backend: BackendView, path: str, limit_s: float) -> None:
        base = str(backend.base_url)
        key = (pool, backend.name)
        try:
            async with asyncio.timeout(limit_s):
                text = await self._fetch(URL(base.rstrip("/") + path, encoded=True))
            load = parse_replica_metrics(text)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # The old value stays, to go stale. Never log the URL: it may
            # carry credentials.
            if key not in self._failing:
                self._failing.add(key)
                log.warning(
                    "saturation: scraping %s/%s failed (%s: %s); its values go stale",
                    pool,
                    backend.name,
                    type(exc).__name__,
                    exc,
                )
            return
        self.samples[key] = Sample(load, base, self._clock())
        if key in self._failing:
            self._failing.discard(key)
            log.info("saturation: scraping %s/%s works again", pool, backend.name)

    async def _fetch(self, url: URL) -> str:
        headers = {"Accept": "text/plain;version=0.0.4"}
        async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                msg = f"HTTP {resp.status}"
                raise ValueError(msg)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_METRICS_BYTES:
                    msg = f"metrics larger than {MAX_METRICS_BYTES} bytes"
                    raise ValueError(msg)
            return body.decode("utf-8", errors="replace")
