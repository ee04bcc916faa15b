"""Health, metrics and the test-control API of the simulated replica.

``/health`` and ``/metrics`` are what a gateway sees of a real vLLM server.
``/sim/...`` is for tests and demos only:

- ``GET /sim/faults``: the current fault settings;
- ``POST /sim/faults``: set some of them (a JSON object; all or none applied);
- ``DELETE /sim/faults``: restore the settings the replica started with;
- ``GET /sim/stats``: exact counters (see :mod:`llmproxy.sim.state`);
- ``POST /sim/reset``: zero the counters.
"""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from llmproxy.sim.config import apply_faults, faults_of
from llmproxy.sim.openai_api import openai_error
from llmproxy.sim.state import REPLICA


async def health(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    replica.stats.health_checks += 1
    return web.Response(status=503 if replica.cfg.unhealthy else 200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[REPLICA].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(faults_of(request.app[REPLICA].cfg))


async def set_faults(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    try:
        updates = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return openai_error(400, f"Invalid JSON body: {exc}")
    if not isinstance(updates, dict):
        return openai_error(400, "The request body must be a JSON object of fault fields.")
    try:
        apply_faults(replica.cfg, updates)
    except ValueError as exc:
        return openai_error(400, str(exc))
    return web.json_response(faults_of(replica.cfg))


async def restore_faults(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    apply_faults(replica.cfg, replica.initial_faults)
    return web.json_response(faults_of(replica.cfg))


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[REPLICA].stats_json())


async def reset(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    replica.stats.reset()
    return web.json_response(replica.stats_json())


def routes() -> list[web.RouteDef]:
    return [
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.get("/sim/faults", get_faults),
        web.post("/sim/faults", set_faults),
        web.delete("/sim/faults", restore_faults),
        web.get("/sim/stats", stats),
        web.post("/sim/reset", reset),
    ]
