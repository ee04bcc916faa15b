"""Building and running a simulated replica.

:func:`build_app` makes the aiohttp application; :func:`sim_server` runs one
on a real socket for as long as a ``async with`` block lasts (tests, the
demo); :func:`serve` runs one until cancelled (the command line).

The server runs with ``handler_cancellation=True``: when a client goes away,
aiohttp cancels its handler, which is how the replica counts cancellations.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from llmproxy.sim import control, openai_api, tgi_api
from llmproxy.sim.config import SimConfig
from llmproxy.sim.state import REPLICA, Replica

#: Seconds a stopping replica lets in-flight requests finish before cancelling them.
SHUTDOWN_GRACE_S = 0.5
#: Largest request body accepted, in bytes (aiohttp's default is 1 MiB).
MAX_BODY_BYTES = 16 * 1024 * 1024


def build_app(cfg: SimConfig) -> web.Application:
    """A replica app; ``cfg`` stays shared with it, so changes to it apply live."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[REPLICA] = Replica(cfg)
    app.add_routes(openai_api.routes())
    app.add_routes(tgi_api.routes())
    app.add_routes(control.routes())
    return app


@dataclass(frozen=True, slots=True)
class SimServer:
    """A running replica."""

    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43817`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        return self.app[REPLICA].cfg

    @property
    def replica(self) -> Replica:
        return self.app[REPLICA]


@asynccontextmanager
async def sim_server(cfg: SimConfig) -> AsyncIterator[SimServer]:
    """Run a replica on ``cfg.host:cfg.port`` (0 = any free port) inside the block."""
    app = build_app(cfg)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = int(runner.addresses[0][1])
        yield SimServer(app=app, host=cfg.host, port=port)
    finally:
        await runner.cleanup()


async def serve(cfg: SimConfig) -> None:
    """Run a replica until cancelled; print ``sim listening on URL`` once it listens."""
    async with sim_server(cfg) as server:
        print(f"sim listening on {server.url}", file=sys.stdout, flush=True)
        await asyncio.get_running_loop().create_future()
