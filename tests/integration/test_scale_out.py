"""Scale-out: several gateway instances sharing "backend down" news through
Redis, DNS discovery driving a pool, and the autoscaling signals."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from llmproxy.app import make_runner
from llmproxy.config import parse_config
from llmproxy.gateway import Gateway as InProcessGateway
from tests.redis_support import redis_server
from tests.support import Gateway, Sim, http, pool_config, wait_for

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 0.5, "healthy_threshold": 1,
               "unhealthy_threshold": 1, "jitter": 0}  # fmt: skip


def available(gw: Gateway, backend: str) -> bool:
    for b in gw.state()["pools"]["main"]["backends"]:
        if b["name"] == backend:
            return bool(b["available"])
    raise KeyError(backend)


def test_down_news_reaches_the_other_instance(tmp_path: Path) -> None:
    """Instance A health-checks and finds a replica dead; instance B, which
    does not health-check at all, stops using it from A's news alone."""
    with redis_server(tmp_path) as redis:
        a_sim = Sim(tmp_path, "--model", "m", name="a")
        b_sim = Sim(tmp_path, "--model", "m", name="b")
        cluster = {"enabled": True, "redis": redis.url}
        cfg_a = pool_config(a_sim.url, b_sim.url, health=FAST_HEALTH)
        cfg_b = pool_config(a_sim.url, b_sim.url, health={"enabled": False},
                            breaker={"reset_timeout_s": 30})  # fmt: skip
        gw_a = Gateway(tmp_path, {**cfg_a, "cluster": cluster}, name="gw-a")
        gw_b = Gateway(tmp_path, {**cfg_b, "cluster": cluster}, name="gw-b")
        dead = a_sim.url.removeprefix("http://")
        try:
            assert available(gw_b, dead)
            a_sim.kill()
            wait_for(lambda: not available(gw_a, dead), what="A sees the replica down")
            wait_for(lambda: not available(gw_b, dead), timeout=3, what="B heard the news")
            # B now serves every request from the live replica, first attempt.
            for _ in range(6):
                status, headers, _ = http("POST", f"{gw_b.url}/v1/chat/completions", BODY)
                assert status == 200
                assert headers["x-llmproxy-attempts"] == "1"
            assert "held out" in gw_b.log()
        finally:
            gw_a.stop()
            gw_b.stop()
            a_sim.stop()
            b_sim.stop()


def test_autoscaling_signals_are_exported(tmp_path: Path) -> None:
    sim = Sim(tmp_path, "--model", "m", "--max-concurrency", "1", "--ttft-ms", "300")
    cfg = pool_config(sim.url)
    cfg["pools"]["main"]["autoscale"] = {
        "scrape_interval_s": 0.1,
        "stale_after_s": 1,
        "target_in_flight_per_replica": 0.5,
    }
    gw = Gateway(tmp_path, cfg)

    def gauge(name: str) -> float | None:
        m = re.search(rf'^{name}{{pool="main"}} (\S+)$', gw.metrics(), re.M)
        return float(m.group(1)) if m else None

    async def load() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s:

            async def one() -> None:
                async with s.post(f"{gw.url}/v1/chat/completions", json=BODY) as r:
                    await r.read()

            task = asyncio.gather(*(one() for _ in range(4)))
            # While the replica holds one and queues three, the gateway sees
            # the queue (vLLM's gauge) and asks for more replicas.
            await asyncio.to_thread(
                wait_for, lambda: (gauge("llmproxy_pool_requests_waiting") or 0) >= 1,
                5.0, 0.05, "waiting requests scraped",
            )  # fmt: skip
            desired = gauge("llmproxy_pool_desired_replicas")
            assert desired is not None
            assert desired >= 2  # 4 in flight / 0.5 per replica = 8, as it drains
            await task

    try:
        asyncio.run(load())
    finally:
        gw.stop()
        sim.stop()


class FakeResolver:
    """DNS answers set by the test."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.fail = False

    async def resolve(self, name: str) -> list[str]:
        if self.fail:
            raise OSError("SERVFAIL")
        return list(self.answers)


async def test_dns_discovery_joins_and_drains(tmp_path: Path) -> None:
    """A pool fed by DNS: a new address joins only after its health checks,
    a vanished one drains, a failing lookup keeps the last good set."""
    # Discovery gives addresses and one port: two replicas on two loopback
    # addresses, same port.
    first_sim = Sim(tmp_path, "--model", "m", name="d0")
    port = int(first_sim.url.rsplit(":", 1)[1])
    second_sim = Sim(
        tmp_path, "--model", "m", "--host", "127.0.0.2", "--port", str(port), name="d1"
    )
    sims = [first_sim, second_sim]
    ports = [port]
    resolver = FakeResolver(["127.0.0.1"])
    raw: dict[str, Any] = {
        "pools": {
            "main": {
                "discovery": {"dns": "replicas.test", "port": ports[0], "refresh_s": 0.05},
                "health": FAST_HEALTH,
            }
        },
        "routes": [{"name": "all", "match": {"model": "*"}, "pool": "main"}],
        "admin": {"enabled": False},
    }
    gw = InProcessGateway(parse_config(raw, {}), resolver=resolver)
    runner = make_runner(gw)
    await runner.setup()
    try:
        pool = gw.runtime.pools["main"]
        assert [b.name for b in pool.backends] == [f"127.0.0.1:{ports[0]}"]
        # Another address appears: it joins held out, then passes its checks.
        resolver.answers = ["127.0.0.1", "127.0.0.2"]
        await eventually(lambda: len(gw.runtime.pools["main"].backends) == 2)
        joined = gw.runtime.pools["main"].get(f"127.0.0.2:{ports[0]}")
        assert joined is not None
        await eventually(lambda: joined.healthy)
        # A failing resolver keeps the last good set.
        resolver.fail = True
        await eventually(lambda: gw.discovery.snapshot()["main"]["last_error"])
        assert len(gw.runtime.pools["main"].backends) == 2
        # The first address vanishes: it drains (kept by in-flight requests), not cut.
        resolver.fail = False
        first = gw.runtime.pools["main"].get(f"127.0.0.1:{ports[0]}")
        assert first is not None
        resolver.answers = ["127.0.0.2"]
        await eventually(lambda: len(gw.runtime.pools["main"].backends) == 1)
        assert first.draining
    finally:
        await runner.cleanup()
        for s in sims:
            s.stop()


async def eventually(cond: Any, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
