"""The admin listener: metrics, probes, and the operator API.

It is a separate ``web.Application`` on its own port so that operator traffic
and scrapes never queue behind user traffic, and so it can stay on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmproxy.admin.status_page import status_page_handler
from llmproxy.errors import (
    BadRequest,
    NotFound,
    Unauthorized,
    error_middleware,
    proxy_error_response,
)
from llmproxy.keys import GATEWAY
from llmproxy.policy.traffic import TrafficError

if TYPE_CHECKING:
    from llmproxy.gateway import Gateway

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminConfigError(ValueError):
    """The admin listener would be reachable from the network without a token."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token(
    token: str | None, current: Callable[[], str | None] | None = None
) -> Callable[[_Handler], _Handler]:
    """Guard handlers with ``Authorization: Bearer TOKEN``.

    ``current`` gives the token of the config in force, so that a reload
    rotates it. When a reload drops the token, the last one seen in force
    (at first ``token``) stays required: a reload never opens a guarded
    admin API.
    """
    last = token

    def wrap(handler: _Handler) -> _Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            nonlocal last
            live = current() if current is not None else None
            if live:
                last = live
            if last:
                expected = f"Bearer {last}".encode()
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return proxy_error_response(
                        Unauthorized(
                            "missing or wrong admin token",
                            headers={"WWW-Authenticate": "Bearer"},
                        )
                    )
            return await handler(request)

        return guarded

    return wrap


def backend_state(gw: Gateway) -> dict[str, Any]:
    now = gw.clock()
    pools: dict[str, Any] = {}
    for pool in gw.runtime.pools.values():
        pools[pool.name] = {
            "balancer": pool.config.balancer,
            "eligible": sum(b.available(now) for b in pool.backends),
            "retry_budget": pool.budget.snapshot(),
            "backends": [
                {
                    "name": b.name,
                    "url": str(b.base_url),
                    "weight": b.weight,
                    "effective_weight": round(b.effective_weight, 4),
                    "in_flight": b.in_flight,
                    "healthy": b.healthy,
                    "health_detail": b.health_detail,
                    "draining": b.draining,
                    "available": b.available(now),
                    "eligible": b.eligible,
                    "slow_start": now < b.ramp_until,
                    "breaker": b.breaker.snapshot(),
                    "outlier": pool.outlier.snapshot(b.name, now),
                }
                for b in pool.backends
            ],
        }
    return pools


async def _state(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    traffic = gw.traffic.snapshot()
    routes = [
        {
            "name": r.name,
            "split": traffic.get(r.name, {}).get("split", []),
            "configured_split": [{"pool": t.pool, "weight": t.weight} for t in r.split],
            "weights_overridden": traffic.get(r.name, {}).get("overridden", False),
            "canary": traffic.get(r.name, {}).get("canary"),
            "fallback": list(r.fallback),
            "sticky": r.sticky,
        }
        for r in gw.config.routes
    ]
    reload = gw.last_reload
    body = {
        "ready": gw.ready,
        "draining": gw.draining,
        "config_source": gw.config.source,
        "last_reload": {
            "ok": reload.ok,
            "at": reload.at,
            "errors": reload.errors,
            "changes": reload.changes,
        },
        "pools": backend_state(gw),
        "discovery": dict(gw.discovery.snapshot()),
        "routes": routes,
    }
    return web.json_response(body)


async def _set_drain(request: web.Request, draining: bool) -> web.Response:
    gw = request.app[GATEWAY]
    pool, backend = request.match_info["pool"], request.match_info["backend"]
    try:
        b = gw.set_draining(pool, backend, draining)
    except KeyError as exc:
        return proxy_error_response(NotFound(str(exc.args[0])))
    return web.json_response(
        {"pool": pool, "backend": b.name, "draining": b.draining, "in_flight": b.in_flight}
    )


async def _drain(request: web.Request) -> web.Response:
    return await _set_drain(request, True)


async def _undrain(request: web.Request) -> web.Response:
    return await _set_drain(request, False)


async def _set_weights(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    route = request.match_info["route"]
    try:
        body = await request.json()
        weights = body["weights"]
        if not isinstance(weights, dict):
            raise TypeError
        split = gw.traffic.set_weights(route, weights)
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, KeyError) and str(exc.args[0]).startswith("no route"):
            return proxy_error_response(NotFound(str(exc.args[0])))
        detail = str(exc) if isinstance(exc, TrafficError) else 'expected {"weights": {POOL: N}}'
        return proxy_error_response(BadRequest(detail))
    return web.json_response(
        {"route": route, "split": [{"pool": t.pool, "weight": t.weight} for t in split]}
    )


async def _canary_action(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    route, action = request.match_info["route"], request.match_info["action"]
    try:
        verdict = gw.traffic.promote(route) if action == "promote" else gw.traffic.rollback(route)
    except KeyError as exc:
        return proxy_error_response(NotFound(str(exc.args[0])))
    except TrafficError as exc:
        return proxy_error_response(BadRequest(str(exc)))
    return web.json_response(
        {"route": route, "state": verdict.state, "weight": verdict.weight, "reason": verdict.reason}
    )


async def _reload(request: web.Request) -> web.Response:
    status = await request.app[GATEWAY].reload()
    body = {"ok": status.ok, "errors": status.errors, "changes": status.changes}
    return web.json_response(body, status=200 if status.ok else 422)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[GATEWAY].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


def build_admin_app(gateway: Gateway) -> web.Application:
    cfg = gateway.config.admin
    if not cfg.token and not _is_loopback(cfg.host):
        raise AdminConfigError(
            f"admin.token: the admin listener on {cfg.host} is not loopback-only; set a token"
        )
    guard = require_token(cfg.token, lambda: gateway.config.admin.token)
    app = web.Application(middlewares=[error_middleware])
    app[GATEWAY] = gateway
    app.router.add_get("/", status_page_handler)  # no data in it: its fetches send the token
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/state", guard(_state))
    app.router.add_post("/admin/backends/{pool}/{backend}/drain", guard(_drain))
    app.router.add_post("/admin/backends/{pool}/{backend}/undrain", guard(_undrain))
    app.router.add_post("/admin/reload", guard(_reload))
    app.router.add_post("/admin/routes/{route}/weights", guard(_set_weights))
    app.router.add_post(
        r"/admin/routes/{route}/canary/{action:promote|rollback}", guard(_canary_action)
    )
    return app
