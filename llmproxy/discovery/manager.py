"""Pools whose backends come from DNS: resolve at start, follow changes.

A change is applied like a reload of that pool: new addresses join held out
until their health checks pass and in slow start; vanished ones are drained,
not cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from llmproxy.config.schema import BackendConfig, Config
from llmproxy.discovery.dns import DnsDiscovery, Resolver, SystemResolver

log = logging.getLogger(__name__)


class DiscoveryManager:
    def __init__(
        self,
        on_change: Callable[[str, tuple[BackendConfig, ...]], None],
        rng: random.Random,
        clock: Callable[[], float],
        resolver: Resolver | None = None,
    ) -> None:
        self._on_change = on_change
        self._rng = rng
        self._clock = clock
        self._resolver = resolver or SystemResolver()
        self._running: dict[str, tuple[DnsDiscovery, asyncio.Task[None]]] = {}
        #: The latest backends of every discovered pool.
        self.backends: dict[str, tuple[BackendConfig, ...]] = {}

    async def start(self, config: Config) -> None:
        """Resolve every discovered pool once (before it is built), then follow it."""
        await self.stop()
        for name, pool in config.pools.items():
            if pool.discovery is None:
                continue
            disc = DnsDiscovery(
                pool.discovery,
                self._resolver,
                self._changed(name),
                clock=self._clock,
                rng=self._rng,
                pool=name,
            )
            self.backends[name] = tuple(await disc.resolve_once())
            task = asyncio.create_task(disc.run(), name=f"discovery:{name}")
            self._running[name] = (disc, task)

    def _changed(self, pool: str) -> Callable[[list[BackendConfig]], None]:
        def changed(backends: list[BackendConfig]) -> None:
            self.backends[pool] = tuple(backends)
            self._on_change(pool, tuple(backends))

        return changed

    def snapshot(self) -> Mapping[str, Any]:
        return {name: disc.snapshot() for name, (disc, _) in self._running.items()}

    async def stop(self) -> None:
        tasks = [t for _, t in self._running.values()]
        self._running.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
