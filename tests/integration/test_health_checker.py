"""The active health checker over real sockets, against simulated replicas."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from llmproxy.config.schema import HealthConfig
from llmproxy.health.checker import CheckTarget, HealthChecker
from llmproxy.sim import SimConfig, SimServer, sim_server

CFG = HealthConfig(
    path="/health",
    interval_s=0.05,
    timeout_s=1.0,
    healthy_threshold=2,
    unhealthy_threshold=3,
    jitter=0.0,
)


async def eventually(cond: Callable[[], Any], within_s: float = 5.0, what: str = "") -> None:
    """Poll ``cond`` (sync, or returning an awaitable) until truthy; fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or cond}")
        await asyncio.sleep(0.01)


@dataclass
class FakeTarget:
    name: str
    base_url: URL
    in_flight: int = 0


@dataclass
class Recorder:
    """Everything the checker reported, in order: ("result"|"transition", name, ok, text)."""

    events: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def on_result(self, name: str, passed: bool, detail: str) -> None:
        self.events.append(("result", name, passed, detail))

    def on_transition(self, name: str, healthy: bool, reason: str) -> None:
        self.events.append(("transition", name, healthy, reason))

    def results(self, name: str) -> list[tuple[bool, str]]:
        return [(ok, text) for kind, n, ok, text in self.events if kind == "result" and n == name]

    def transitions(self, name: str) -> list[tuple[bool, str]]:
        return [
            (ok, text) for kind, n, ok, text in self.events if kind == "transition" and n == name
        ]

    def streak_before_transition(self, name: str, index: int) -> list[bool]:
        """Results of ``name`` between the previous transition and transition ``index``."""
        streak: list[bool] = []
        seen = 0
        for kind, n, ok, _ in self.events:
            if n != name:
                continue
            if kind == "transition":
                if seen == index:
                    return streak
                seen += 1
                streak = []
            else:
                streak.append(ok)
        raise AssertionError(f"no transition {index} for {name}")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def sims() -> AsyncIterator[Callable[[], Any]]:
    async with contextlib.AsyncExitStack() as stack:

        async def start() -> SimServer:
            cfg = SimConfig(port=0, model="m", ttft_ms=0, tokens_per_s=0)
            return await stack.enter_async_context(sim_server(cfg))

        yield start


async def sim_stats(session: aiohttp.ClientSession, srv: SimServer) -> dict[str, Any]:
    async with session.get(f"{srv.url}/sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


def target(name: str, url: str) -> FakeTarget:
    return FakeTarget(name, URL(url))


@contextlib.asynccontextmanager
async def checking(
    session: aiohttp.ClientSession,
    targets: Sequence[CheckTarget] | Callable[[], Sequence[CheckTarget]],
    cfg: HealthConfig = CFG,
) -> AsyncIterator[tuple[HealthChecker, Recorder]]:
    rec = Recorder()
    checker = HealthChecker(
        targets=targets if callable(targets) else lambda: targets,
        cfg=cfg,
        session=session,
        rng=random.Random(7),
        on_result=rec.on_result,
        on_transition=rec.on_transition,
    )
    task = asyncio.create_task(checker.run())
    try:
        yield checker, rec
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def checker_tasks() -> set[asyncio.Task[Any]]:
    """Live tasks that belong to a health checker."""
    return {
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("health:")
        or getattr(t.get_coro(), "__qualname__", "").startswith("HealthChecker.")
    } - {asyncio.current_task()}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def hanging_server() -> AsyncIterator[str]:
    """A server whose /health never answers."""

    async def never(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/health", never)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_healthy_backend_stays_up_and_is_probed_repeatedly(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    async with checking(session, [target("a", srv.url)]) as (checker, rec):
        await eventually(lambda: _at_least(session, srv, 4), what="four health checks")
        assert rec.transitions("a") == []
        assert all(r == (True, "HTTP 200") for r in rec.results("a"))
        assert checker.healthy("a")
        snap = checker.snapshot("a")
        assert snap["healthy"] is True
        assert snap["last_result"] is True
        assert snap["last_detail"] == "HTTP 200"
        assert 0.0 <= snap["last_checked_ago_s"] < 5.0
        assert snap["consecutive"] >= 1


async def _at_least(session: aiohttp.ClientSession, srv: SimServer, checks: int) -> bool:
    return int((await sim_stats(session, srv))["health_checks"]) >= checks


async def test_down_after_exactly_unhealthy_threshold_and_up_after_healthy_threshold(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    async with checking(session, [target("a", srv.url)]) as (checker, rec):
        await eventually(lambda: len(rec.results("a")) >= 2, what="two passes")
        srv.config.unhealthy = True
        await eventually(lambda: rec.transitions("a"), what="going down")
        assert rec.transitions("a") == [(False, "HTTP 503")]
        assert rec.streak_before_transition("a", 0)[-4:] == [True, False, False, False]
        assert not checker.healthy("a")
        assert checker.snapshot("a")["last_detail"] == "HTTP 503"

        srv.config.unhealthy = False
        await eventually(lambda: len(rec.transitions("a")) == 2, what="coming back")
        assert rec.transitions("a")[1] == (True, "HTTP 200")
        streak = rec.streak_before_transition("a", 1)  # results since going down
        assert streak == [False] * (len(streak) - 2) + [True, True]
        assert checker.healthy("a")


async def test_closed_port_goes_down_with_a_connect_reason(
    session: aiohttp.ClientSession,
) -> None:
    async with checking(session, [target("gone", closed_port_url())]) as (checker, rec):
        await eventually(lambda: rec.transitions("gone"), what="going down")
        assert rec.transitions("gone") == [(False, "connect refused")]
        assert rec.streak_before_transition("gone", 0) == [False, False, False]
        assert not checker.healthy("gone")


async def test_hanging_health_endpoint_goes_down_with_a_timeout_reason(
    session: aiohttp.ClientSession,
) -> None:
    cfg = replace(CFG, timeout_s=0.1, unhealthy_threshold=2)
    async with hanging_server() as url, checking(session, [target("h", url)], cfg) as (c, rec):
        await eventually(lambda: rec.transitions("h"), what="going down")
        assert rec.transitions("h") == [(False, "timeout after 0.1s")]
        assert not c.healthy("h")


async def test_targets_added_and_removed_at_run_time(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    a, b = await sims(), await sims()
    targets: list[FakeTarget] = [target("a", a.url)]
    async with checking(session, lambda: list(targets)) as (checker, rec):
        await eventually(lambda: rec.results("a"), what="a probed")
        assert not rec.results("b")

        targets.append(target("b", b.url))
        await eventually(lambda: _at_least(session, b, 2), what="b probed")
        assert checker.snapshot("b")["last_result"] is True

        targets.pop(0)
        await eventually(
            lambda: not any(t.get_name() == "health:a" for t in asyncio.all_tasks()),
            what="a's task gone",
        )
        assert checker.snapshot("a")["last_result"] is None  # its state was dropped
        seen_a = int((await sim_stats(session, a))["health_checks"])
        seen_b = int((await sim_stats(session, b))["health_checks"])
        await eventually(lambda: _at_least(session, b, seen_b + 3), what="b probed further")
        assert int((await sim_stats(session, a))["health_checks"]) == seen_a


async def test_cancelling_run_leaves_no_task_behind(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    cfg = replace(CFG, timeout_s=30.0, deep_interval_s=0.05, deep_timeout_s=30.0)
    async with hanging_server() as hang_url:
        targets = [target("a", srv.url), target("h", hang_url), target("x", closed_port_url())]
        rec = Recorder()
        checker = HealthChecker(
            targets=lambda: targets,
            cfg=cfg,
            session=session,
            rng=random.Random(1),
            on_result=rec.on_result,
            on_transition=rec.on_transition,
        )
        run = asyncio.create_task(checker.run())
        await eventually(lambda: rec.results("a") and rec.results("x"), what="probes done")
        await eventually(lambda: len(checker_tasks()) >= 4, what="backend tasks")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, timeout=2.0)  # the hanging probe must not hold it up
        assert checker_tasks() == set()


async def test_deep_check_runs_when_idle(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    cfg = replace(CFG, deep_interval_s=0.05, deep_timeout_s=5.0)
    async with checking(session, [target("a", srv.url)], cfg) as (checker, rec):
        await eventually(lambda: (True, "deep: HTTP 200") in rec.results("a"), what="deep pass")
        stats = await sim_stats(session, srv)
        assert stats["completed"] >= 1
        assert stats["last_headers"]  # a real completions request reached the replica
        assert checker.snapshot("a")["deep_checks"] >= 1
        assert rec.transitions("a") == []


async def test_deep_check_is_skipped_while_requests_are_in_flight(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    busy = FakeTarget("a", URL(srv.url), in_flight=1)
    cfg = replace(CFG, deep_interval_s=0.05, deep_timeout_s=5.0)
    async with checking(session, [busy], cfg) as (checker, rec):
        await eventually(lambda: checker.snapshot("a")["deep_skipped"] >= 3, what="skips")
        assert (await sim_stats(session, srv))["requests"] == 0
        assert checker.snapshot("a")["deep_checks"] == 0
        assert not any(detail.startswith("deep") for _, detail in rec.results("a"))

        busy.in_flight = 0
        await eventually(lambda: (True, "deep: HTTP 200") in rec.results("a"), what="deep pass")
        assert (await sim_stats(session, srv))["requests"] >= 1


async def test_failing_deep_check_takes_down_a_backend_whose_health_says_ok(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    srv.config.hang = True  # generation hangs; /health still answers 200
    cfg = replace(CFG, deep_interval_s=0.05, deep_timeout_s=0.2, unhealthy_threshold=2)
    async with checking(session, [target("a", srv.url)], cfg) as (checker, rec):
        await eventually(lambda: rec.transitions("a"), what="going down")
        assert rec.transitions("a") == [(False, "deep: timeout after 0.2s")]
        assert (True, "HTTP 200") in rec.results("a")
        assert checker.snapshot("a")["deep_failing"] is True

        srv.config.hang = False
        await eventually(lambda: len(rec.transitions("a")) == 2, what="coming back")
        assert rec.transitions("a")[1][0] is True
        assert checker.healthy("a")


async def test_deep_check_with_an_unknown_model_fails(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    cfg = replace(CFG, deep_interval_s=0.05, deep_model="nope", unhealthy_threshold=1)
    async with checking(session, [target("a", srv.url)], cfg) as (_, rec):
        await eventually(lambda: rec.transitions("a"), what="going down")
        ((healthy, reason),) = rec.transitions("a")
        assert not healthy
        assert reason.startswith("deep: HTTP 4"), reason


async def test_deep_pass_does_not_bring_back_a_backend_whose_health_fails(
    session: aiohttp.ClientSession, sims: Callable[[], Any]
) -> None:
    srv = await sims()
    srv.config.unhealthy = True
    cfg = replace(CFG, deep_interval_s=0.05, healthy_threshold=1, unhealthy_threshold=1)
    async with checking(session, [target("a", srv.url)], cfg) as (checker, rec):
        await eventually(lambda: rec.transitions("a"), what="going down")
        deep_passes = rec.results("a").count((True, "deep: HTTP 200"))
        await eventually(
            lambda: rec.results("a").count((True, "deep: HTTP 200")) >= deep_passes + 3,
            what="more deep passes",
        )
        assert rec.transitions("a") == [(False, "HTTP 503")]
        assert not checker.healthy("a")
