"""The saturation scraper against real simulated replicas (separate processes).

A replica with one generation slot and a slow first token queues concurrent
requests: its ``vllm:num_requests_waiting`` must show up in the collector. A
killed replica's values must go stale, while its neighbour's stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from yarl import URL

from llmproxy.observability.saturation import AutoscaleConfig, SaturationScraper
from tests.support import Sim

FAST = AutoscaleConfig(scrape_interval_s=0.05, stale_after_s=0.5, target_in_flight_per_replica=2.0)


@dataclass
class FakeBackend:
    name: str
    base_url: URL
    in_flight: int = 0


@dataclass
class FakePool:
    name: str
    backends: list[FakeBackend] = field(default_factory=list)


async def eventually(
    check: Callable[[], Any], within_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds; fail after ``within_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def busy_sim(tmp_path: Path) -> Iterator[Sim]:
    sim = Sim(tmp_path, "--max-concurrency", "1", "--ttft-ms", "300", name="busy")
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def idle_sim(tmp_path: Path) -> Iterator[Sim]:
    sim = Sim(tmp_path, name="idle")
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Harness:
    """A scraper running over ``pools`` and the registry it exports to."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pools: dict[str, FakePool],
        settings: dict[str, AutoscaleConfig],
    ) -> None:
        self.pools = pools
        self.registry = CollectorRegistry()
        self.scraper = SaturationScraper(
            lambda: self.pools,
            session,
            asyncio.get_running_loop().time,
            lambda name: settings.get(name, FAST),
        )
        self.scraper.register(self.registry)

    def value(self, name: str, pool: str, backend: str | None = None) -> float | None:
        labels = {"pool": pool} if backend is None else {"pool": pool, "backend": backend}
        return self.registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def scraping(
    session: aiohttp.ClientSession,
    pools: dict[str, FakePool],
    settings: dict[str, AutoscaleConfig] | None = None,
) -> AsyncIterator[Harness]:
    h = Harness(session, pools, settings or {})
    task = asyncio.create_task(h.scraper.run(), name="saturation-test")
    try:
        yield h
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def chat(session: aiohttp.ClientSession, sim: Sim) -> None:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 200,
    }
    async with session.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
        await resp.read()


def backend(name: str, sim: Sim, in_flight: int = 0) -> FakeBackend:
    return FakeBackend(name, URL(sim.url), in_flight)


async def test_waiting_requests_appear_then_a_killed_replica_goes_stale(
    session: aiohttp.ClientSession, busy_sim: Sim, idle_sim: Sim
) -> None:
    busy, idle = backend("busy", busy_sim, in_flight=4), backend("idle", idle_sim)
    pools = {"main": FakePool("main", [busy, idle])}
    requests = [asyncio.create_task(chat(session, busy_sim)) for _ in range(4)]
    try:
        async with scraping(session, pools) as h:

            def queued() -> bool:
                waiting = h.value("llmproxy_backend_requests_waiting", "main", "busy")
                return waiting is not None and waiting > 0

            await eventually(queued, what="waiting > 0 on the busy replica")
            # The idle replica is fresh too, so the pool's sum covers both.
            await eventually(
                lambda: h.value("llmproxy_backend_scrape_stale", "main", "idle") == 0.0,
                what="the idle replica to be scraped",
            )
            pool_waiting = h.value("llmproxy_pool_requests_waiting", "main")
            assert pool_waiting is not None
            assert pool_waiting > 0
            assert (h.value("llmproxy_pool_requests_running", "main") or 0) >= 1
            assert h.value("llmproxy_pool_in_flight", "main") == 4
            assert h.value("llmproxy_pool_desired_replicas", "main") == 2.0  # 4 / 2
            assert h.value("llmproxy_backend_scrape_stale", "main", "busy") == 0.0

            busy_sim.kill()
            await eventually(
                lambda: h.value("llmproxy_backend_scrape_stale", "main", "busy") == 1.0,
                within_s=FAST.stale_after_s + 10.0,
                what="the killed replica to go stale",
            )
            assert h.value("llmproxy_backend_requests_waiting", "main", "busy") is None
            # Its last value is kept (a failed scrape does not erase it) but
            # no longer counts: the pool's sum is the idle replica's 0.
            assert h.scraper.samples[("main", "busy")].load.waiting > 0
            assert h.value("llmproxy_pool_requests_waiting", "main") == 0.0
            assert h.value("llmproxy_backend_scrape_stale", "main", "idle") == 0.0
            # In flight is the gateway's own count, unaffected by scraping.
            assert h.value("llmproxy_pool_in_flight", "main") == 4
    finally:
        for r in requests:
            r.cancel()
        await asyncio.gather(*requests, return_exceptions=True)


async def test_a_replica_without_vllm_metrics_stays_stale_and_is_logged_once(
    session: aiohttp.ClientSession, idle_sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmproxy.observability.saturation")
    good = backend("good", idle_sim)
    wrong = backend("wrong", idle_sim)
    pools = {"ok": FakePool("ok", [good]), "bad": FakePool("bad", [wrong])}
    # /v1/models answers 200 with JSON: not Prometheus text.
    settings = {"bad": AutoscaleConfig(scrape_interval_s=0.05, metrics_path="/v1/models")}
    async with scraping(session, pools, settings) as h:

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "bad/wrong" in r.getMessage()]

        def ok_scraped_at() -> float:
            sample = h.scraper.samples.get(("ok", "good"))
            return sample.at if sample is not None else 0.0

        await eventually(failures, what="the failed scrape to be logged")
        # Several more rounds of both pools (same interval, same loop).
        for _ in range(5):
            before = ok_scraped_at()
            await eventually(lambda: ok_scraped_at() > before, what="another round")  # noqa: B023
        assert len(failures()) == 1
        assert failures()[0].levelno == logging.WARNING
        assert h.value("llmproxy_backend_scrape_stale", "bad", "wrong") == 1.0
        assert h.value("llmproxy_pool_requests_waiting", "bad") is None
        assert h.value("llmproxy_pool_requests_waiting", "ok") == 0.0


async def test_disabled_pools_are_not_scraped_and_gone_backends_are_forgotten(
    session: aiohttp.ClientSession, idle_sim: Sim
) -> None:
    a, b = backend("a", idle_sim), backend("b", idle_sim)
    pools = {"main": FakePool("main", [a, b]), "off": FakePool("off", [backend("c", idle_sim)])}
    settings = {"off": AutoscaleConfig(enabled=False)}
    async with scraping(session, pools, settings) as h:
        await eventually(
            lambda: {("main", "a"), ("main", "b")} <= h.scraper.samples.keys(),
            what="both backends scraped",
        )
        pools["main"].backends.remove(b)  # e.g. discovery dropped it
        await eventually(
            lambda: ("main", "b") not in h.scraper.samples, what="the gone backend forgotten"
        )
        assert ("off", "c") not in h.scraper.samples
        assert h.value("llmproxy_pool_in_flight", "off") is None
