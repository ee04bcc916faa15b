"""One active health checker task per pool, kept in step with the config."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import aiohttp

from llmproxy.config.schema import HealthConfig
from llmproxy.health.checker import HealthChecker
from llmproxy.observability.events import Events
from llmproxy.pool.backend import Backend
from llmproxy.runtime import Runtime


class HealthSupervisor:
    def __init__(
        self,
        runtime: Callable[[], Runtime],
        session: aiohttp.ClientSession,
        rng: random.Random,
        events: Events,
        clock: Callable[[], float],
    ) -> None:
        self._runtime = runtime
        self._session = session
        self._rng = rng
        self._events = events
        self._clock = clock
        self._checkers: dict[str, tuple[HealthConfig, asyncio.Task[None]]] = {}

    def sync(self) -> None:
        """Start checkers for new pools, stop removed ones, restart changed ones."""
        pools = self._runtime().pools
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
                targets=self._targets(name),
                cfg=pool.config.health,
                session=self._session,
                rng=self._rng,
                on_result=self._on_result(name),
                on_transition=self._on_transition(name),
                clock=self._clock,
            )
            task = asyncio.create_task(checker.run(), name=f"health:{name}")
            self._checkers[name] = (pool.config.health, task)

    def _targets(self, pool: str) -> Callable[[], list[Backend]]:
        def targets() -> list[Backend]:
            p = self._runtime().pools.get(pool)
            return p.backends if p is not None else []

        return targets

    def _on_result(self, pool: str) -> Callable[[str, bool, str], None]:
        def on_result(backend: str, passed: bool, _detail: str) -> None:
            self._events.health_probe(pool, backend, passed)

        return on_result

    def _on_transition(self, pool: str) -> Callable[[str, bool, str], None]:
        def on_transition(backend: str, healthy: bool, reason: str) -> None:
            p = self._runtime().pools.get(pool)
            if p is not None:
                p.set_health(backend, healthy, reason)

        return on_transition

    async def close(self) -> None:
        tasks = [task for _, task in self._checkers.values()]
        self._checkers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
