"""Saturation signals, the pure parts: parsing replica metrics, staleness, the
desired-replica arithmetic, and what the collector exports (fake clock)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from yarl import URL

from llmproxy.config.schema import BackendConfig, PoolConfig
from llmproxy.health.outlier import Ejection
from llmproxy.observability.saturation import (
    AutoscaleConfig,
    PoolView,
    ReplicaLoad,
    Sample,
    SaturationCollector,
    desired_replicas,
    fresh_load,
    parse_replica_metrics,
)
from llmproxy.pool.pool import Pool
from llmproxy.resilience.breaker import BreakerState
from llmproxy.sim.gate import ConcurrencyGate
from llmproxy.sim.metrics import SimMetrics

# -- parsing -------------------------------------------------------------------------


async def test_parses_what_the_simulated_replica_exposes() -> None:
    gate = ConcurrencyGate(2)
    await gate.acquire()
    await gate.acquire()
    queued = [asyncio.ensure_future(gate.acquire()) for _ in range(3)]
    await asyncio.sleep(0)  # let them queue
    try:
        load = parse_replica_metrics(SimMetrics("m", gate).render().decode())
    finally:
        for q in queued:
            q.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
    assert load == ReplicaLoad(waiting=3.0, running=2.0, kv_cache_usage=1.0)


VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 5.0
vllm:num_requests_running{engine="1",model_name="llama"} 3.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 3.5
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.9
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 1234.0
"""


def test_series_are_summed_and_the_cache_usage_averaged() -> None:
    load = parse_replica_metrics(VLLM_TEXT)
    assert load.waiting == 7.0
    assert load.running == 8.0
    assert load.kv_cache_usage == pytest.approx(0.7)


def test_older_vllm_and_tgi_names_are_read_when_the_new_ones_are_absent() -> None:
    old_vllm = "vllm:num_requests_waiting 2\nvllm:gpu_cache_usage_perc 0.25\n"
    assert parse_replica_metrics(old_vllm) == ReplicaLoad(2.0, None, 0.25)
    tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 4\ntgi_batch_current_size 16\n"
    assert parse_replica_metrics(tgi) == ReplicaLoad(4.0, 16.0, None)


def test_only_the_waiting_gauge_is_required() -> None:
    assert parse_replica_metrics("vllm:num_requests_waiting 1\n") == ReplicaLoad(1.0)


def test_non_finite_values_are_skipped() -> None:
    text = 'vllm:num_requests_waiting{a="1"} NaN\nvllm:num_requests_waiting{a="2"} 3\n'
    assert parse_replica_metrics(text).waiting == 3.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>not metrics</html>\n",
        '{"object": "list", "data": []}',
        "vllm:num_requests_running 3\n",  # no waiting gauge
        "vllm:num_requests_waiting{model_name=llama} 1\n",  # unquoted label
        "vllm:num_requests_waiting seven\n",
        "{broken 1\nvllm:num_requests_waiting{\n",
    ],
)
def test_bad_metrics_are_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - a failed scrape is any ValueError
        parse_replica_metrics(text)


# -- arithmetic and staleness ------------------------------------------------------------


def test_desired_replicas_is_in_flight_over_the_target_unrounded() -> None:
    assert desired_replicas(10, 8.0) == 1.25
    assert desired_replicas(0, 8.0) == 0.0


def test_desired_replicas_summed_over_instances_stays_exact() -> None:
    # Three gateways carry 3, 3 and 2 requests: one replica is enough.
    # Rounding each share up before the sum would ask for three.
    shares = [desired_replicas(n, 8.0) for n in (3, 3, 2)]
    assert sum(shares) == 1.0


def test_desired_replicas_needs_a_positive_target() -> None:
    with pytest.raises(ValueError, match="target"):
        desired_replicas(1, 0.0)


URL_A = "http://10.0.0.1:8000"


def test_a_sample_is_fresh_up_to_stale_after_s() -> None:
    s = Sample(ReplicaLoad(1.0), URL_A, at=100.0)
    assert fresh_load(s, URL_A, now=115.0, stale_after_s=15.0) == ReplicaLoad(1.0)
    assert fresh_load(s, URL_A, now=115.001, stale_after_s=15.0) is None
    assert fresh_load(None, URL_A, now=100.0, stale_after_s=15.0) is None


def test_a_sample_of_another_url_does_not_count() -> None:
    s = Sample(ReplicaLoad(1.0), URL_A, at=100.0)
    assert fresh_load(s, "http://10.0.0.2:8000", now=100.0, stale_after_s=15.0) is None


# -- the collector ---------------------------------------------------------------------------


@dataclass
class FakeBackend:
    name: str
    base_url: URL
    in_flight: int = 0


@dataclass
class FakePool:
    name: str
    backends: list[FakeBackend] = field(default_factory=list)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def backend(name: str, in_flight: int = 0) -> FakeBackend:
    return FakeBackend(name, URL(f"http://{name}:8000"), in_flight)


class Setup:
    def __init__(
        self, pools: Mapping[str, PoolView], clock: Clock | None = None, **settings: AutoscaleConfig
    ) -> None:
        self.pools = pools
        self.settings = settings
        self.samples: dict[tuple[str, str], Sample] = {}
        self.clock = clock or Clock()
        self.registry = CollectorRegistry()
        collector = SaturationCollector(
            lambda: self.pools,
            lambda name: self.settings.get(name, AutoscaleConfig()),
            self.samples,
            self.clock,
        )
        self.registry.register(collector)

    def scraped(self, pool: str, b: FakeBackend, load: ReplicaLoad, ago: float = 0.0) -> None:
        self.samples[(pool, b.name)] = Sample(load, str(b.base_url), self.clock.now - ago)

    def value(self, name: str, pool: str, backend: str | None = None) -> float | None:
        labels = {"pool": pool} if backend is None else {"pool": pool, "backend": backend}
        return self.registry.get_sample_value(name, labels)


def test_pool_sums_and_the_desired_replica_count() -> None:
    b1, b2, b3 = backend("b1", 5), backend("b2", 7), backend("b3", 0)
    s = Setup({"main": FakePool("main", [b1, b2, b3])})
    s.scraped("main", b1, ReplicaLoad(waiting=2.0, running=4.0, kv_cache_usage=0.8))
    s.scraped("main", b2, ReplicaLoad(waiting=3.0, running=6.0, kv_cache_usage=0.4))
    s.scraped("main", b3, ReplicaLoad(waiting=0.0, running=None, kv_cache_usage=None))

    assert s.value("llmproxy_pool_in_flight", "main") == 12
    assert s.value("llmproxy_pool_desired_replicas", "main") == 1.5  # 12 / 8
    assert s.value("llmproxy_pool_requests_waiting", "main") == 5.0
    assert s.value("llmproxy_pool_requests_running", "main") == 10.0
    assert s.value("llmproxy_pool_kv_cache_usage", "main") == pytest.approx(0.6)
    assert s.value("llmproxy_backend_requests_waiting", "main", "b2") == 3.0
    assert s.value("llmproxy_backend_scrape_stale", "main", "b1") == 0.0


def test_stale_values_leave_the_sums() -> None:
    b1, b2 = backend("b1", 4), backend("b2", 4)
    s = Setup(
        {"main": FakePool("main", [b1, b2])},
        main=AutoscaleConfig(stale_after_s=15.0, target_in_flight_per_replica=2.0),
    )
    s.scraped("main", b1, ReplicaLoad(2.0, 1.0, 0.2))
    s.scraped("main", b2, ReplicaLoad(3.0, 1.0, 0.6), ago=10.0)
    assert s.value("llmproxy_pool_requests_waiting", "main") == 5.0

    s.clock.now += 5.5  # b2's value is now 15.5 s old
    assert s.value("llmproxy_pool_requests_waiting", "main") == 2.0
    assert s.value("llmproxy_pool_kv_cache_usage", "main") == pytest.approx(0.2)
    assert s.value("llmproxy_backend_scrape_stale", "main", "b2") == 1.0
    assert s.value("llmproxy_backend_requests_waiting", "main", "b2") is None
    assert s.value("llmproxy_backend_scrape_stale", "main", "b1") == 0.0
    # In flight is the gateway's own count: never stale.
    assert s.value("llmproxy_pool_desired_replicas", "main") == 4.0


def test_no_fresh_value_means_no_pool_gauge_not_zero() -> None:
    b1 = backend("b1", 3)
    s = Setup({"main": FakePool("main", [b1])})
    assert s.value("llmproxy_backend_scrape_stale", "main", "b1") == 1.0  # never scraped
    for name in (
        "llmproxy_pool_requests_waiting",
        "llmproxy_pool_requests_running",
        "llmproxy_pool_kv_cache_usage",
    ):
        assert s.value(name, "main") is None, name
    assert s.value("llmproxy_pool_in_flight", "main") == 3
    assert s.value("llmproxy_pool_desired_replicas", "main") == 0.375


def test_a_backend_that_changed_url_is_stale_until_scraped_again() -> None:
    b1 = backend("b1")
    s = Setup({"main": FakePool("main", [b1])})
    s.scraped("main", b1, ReplicaLoad(9.0))
    b1.base_url = URL("http://elsewhere:8000")
    assert s.value("llmproxy_backend_scrape_stale", "main", "b1") == 1.0
    assert s.value("llmproxy_pool_requests_waiting", "main") is None


def test_pools_without_autoscale_are_not_exported() -> None:
    s = Setup(
        {"main": FakePool("main", [backend("b1", 2)]), "batch": FakePool("batch", [backend("b2")])},
        batch=AutoscaleConfig(enabled=False),
    )
    assert s.value("llmproxy_pool_in_flight", "main") == 2
    assert s.value("llmproxy_pool_in_flight", "batch") is None
    assert s.value("llmproxy_backend_scrape_stale", "batch", "b2") is None


def test_the_exposition_names_every_family() -> None:
    s = Setup({"main": FakePool("main", [backend("b1")])})
    text = generate_latest(s.registry).decode()
    for name in (
        "llmproxy_pool_in_flight",
        "llmproxy_pool_requests_waiting",
        "llmproxy_pool_requests_running",
        "llmproxy_pool_kv_cache_usage",
        "llmproxy_pool_desired_replicas",
        "llmproxy_backend_requests_waiting",
        "llmproxy_backend_scrape_stale",
    ):
        assert f"# TYPE {name} gauge" in text, name


def test_registering_twice_is_refused() -> None:
    s = Setup({})
    with pytest.raises(ValueError, match="Duplicated"):
        s.registry.register(SaturationCollector(dict, lambda _: AutoscaleConfig(), {}, Clock()))


class NoEvents:
    def health_changed(self, pool: str, backend: str, healthy: bool, reason: str) -> None:
        pass

    def breaker_changed(
        self, pool: str, backend: str, old: BreakerState, new: BreakerState
    ) -> None:
        pass

    def ejected(self, pool: str, ejection: Ejection) -> None:
        pass


def test_the_gateways_pool_fits_the_view() -> None:
    config = PoolConfig(
        name="main",
        backends=(
            BackendConfig(url="http://127.0.0.1:9001", name="b1"),
            BackendConfig(url="http://127.0.0.1:9002", name="b2"),
        ),
    )
    clock = Clock()
    pool = Pool(config, rng=random.Random(0), clock=clock, events=NoEvents())
    pool.backends[0].in_flight = 3
    pool.backends[1].in_flight = 13
    pools: dict[str, Pool] = {"main": pool}
    s = Setup(pools, clock)
    s.samples[("main", "b1")] = Sample(ReplicaLoad(4.0), "http://127.0.0.1:9001", clock.now)
    assert s.value("llmproxy_pool_in_flight", "main") == 16
    assert s.value("llmproxy_pool_desired_replicas", "main") == 2.0
    assert s.value("llmproxy_backend_requests_waiting", "main", "b1") == 4.0
    assert s.value("llmproxy_backend_scrape_stale", "main", "b2") == 1.0
