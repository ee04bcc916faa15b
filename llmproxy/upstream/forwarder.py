"""The forwarder: from a matched route to a relayed response.

The commit point (ARCHITECTURE §2) organises this module. Until the first
byte of the response body reaches the client, any failure of a backend (a
connect error, a first-byte timeout, a retryable status) moves the request to
another backend and the client sees nothing. After it, a failure ends the
response visibly: an SSE error event for streams, a closed connection (never a
falsely complete body) for everything else.

The first attempt runs directly; only when it fails does a tenacity retry
loop (backoff, retry budget) take over, so the common path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from llmproxy.balancing.base import PickContext
from llmproxy.config.schema import RouteConfig, SplitTarget
from llmproxy.errors import (
    NoEligibleBackend,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
    proxy_error_response,
)
from llmproxy.observability.metrics import Metrics
from llmproxy.observability.tracing import Tracing
from llmproxy.policy.gate import ADMIN_TOKEN_HEADER, POOL_HEADER, GateKeeper
from llmproxy.resilience.retry import RetryableError, make_retrying
from llmproxy.routing.split import choose_pool, sticky_key
from llmproxy.runtime import Runtime
from llmproxy.upstream.attempt import AttemptHook, AttemptRunner, StatusRetry
from llmproxy.upstream.exchange import Exchange, Plan, PlanBudget
from llmproxy.upstream.h1 import H1Client
from llmproxy.upstream.headers import upstream_request_headers
from llmproxy.upstream.request import ParsedRequest, parse_request

log = logging.getLogger(__name__)


class Forwarder:
    def __init__(
        self,
        *,
        client: H1Client,
        metrics: Metrics,
        rng: random.Random,
        runtime: Callable[[], Runtime],
        max_body_bytes: int,
        gate: GateKeeper,
        trust_forwarded_for: bool = False,
        splits: Callable[[RouteConfig], Sequence[SplitTarget]] = lambda r: r.split,
        tracing: Tracing | None = None,
        on_finish: Sequence[Callable[[Exchange, float], None]] = (),
        on_attempt: Sequence[AttemptHook] = (),
        keep_bodies: bool = False,
    ) -> None:
        """``on_finish`` hooks get every request's outcome once, at its end (access
        log, rate-limit settlement); ``on_attempt`` hooks every attempt's (canary
        analysis). Neither may block. ``splits`` gives a route's weights now
        (run-time overrides). ``keep_bodies``: ``Exchange.body`` lasts until
        the request ends (an ``on_finish`` hook logs prompts); otherwise it is
        dropped once the response is committed, so a stream does not hold its
        prompt."""
        self._on_finish = tuple(on_finish)
        self._metrics = metrics
        self._rng = rng
        #: Request ids: unique, not secret, so not from os.urandom, which
        #: releases the GIL: each call let the access log's writer thread in
        #: ahead of the request.
        self._ids = random.Random()
        self._loop = asyncio.get_running_loop()  # made inside it: see AttemptRunner
        self._runtime = runtime
        self._max_body = max_body_bytes
        self._trust_forwarded_for = trust_forwarded_for
        #: Replaced on reload (keys and limits follow the config).
        self.gate = gate
        self._splits = splits
        self._tracing = tracing if tracing is not None else Tracing.disabled()
        self._attempt = AttemptRunner(client, metrics, on_attempt, keep_bodies=keep_bodies)
        self._active: set[Exchange] = set()
        self._idle: asyncio.Event | None = None

    # -- request lifecycle -------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = self._loop
        request_id = request.headers.get("X-Request-Id") or f"{self._ids.getrandbits(128):032x}"
        ex = Exchange(
            request,
            request_id,
            loop.time(),
            asyncio.current_task(loop),
            self._client_ip(request) if self._trust_forwarded_for else request.remote,
        )
        if self._tracing.enabled:  # else the exchange keeps its no-op span
            ex.span = self._tracing.start_request(
                request.method, request.path, request.headers, request_id=request_id
            )
        self._active.add(ex)
        try:
            # No local for the parsed request: _forward lets go of it (and
            # of the body) before the response streams.
            return await self._forward(
                ex, await parse_request(request, self._runtime(), self._max_body)
            )
        except ProxyError as exc:
            resp = proxy_error_response(exc)
            self._attempt.finish_headers(resp, ex)
            ex.status, ex.error = exc.status, exc.message
            ex.outcome = "rejected" if exc.status < 500 else ex.outcome
            if ex.outcome == "client_closed":  # nothing upstream said otherwise
                ex.outcome = "upstream_error"
            return resp
        finally:
            self._active.discard(ex)
            if self._idle is not None and not self._active:
                self._idle.set()
            self._finish(ex, loop.time())

    def _finish(self, ex: Exchange, now: float) -> None:
        """The single place where a request's outcome is reported."""
        m = self._metrics
        ex.span.end(
            ex.status,
            ex.outcome,
            ex.error,
            prompt_tokens=ex.prompt_tokens,
            completion_tokens=ex.completion_tokens,
        )
        requests, duration = m.request_series(ex.route, ex.pool, ex.backend, ex.status)
        requests.inc()
        duration.observe(now - ex.started)
        if ex.completion_tokens is not None and ex.prompt_tokens is not None:
            prompt, completion = m.token_series(ex.route, ex.pool)
            prompt.inc(ex.prompt_tokens)
            completion.inc(ex.completion_tokens)
        for hook in self._on_finish:
            try:
                hook(ex, now)
            except Exception:
                log.exception("request %s: a finish hook failed", ex.request_id)

    def _client_ip(self, request: web.BaseRequest) -> str | None:
        """The client's address for ``ip`` keys: the peer, or with
        ``server.trust_forwarded_for`` the first address of X-Forwarded-For
        (the client as the trusted load balancer in front saw it)."""
        if self._trust_forwarded_for:
            forwarded = request.headers.get("X-Forwarded-For")
            if forwarded:
                first = forwarded.split(",", 1)[0].strip()
                if first:
                    return first
        return request.remote

    @property
    def active_count(self) -> int:
        return len(self._active)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if ``timeout_s`` passed first."""
        if not self._active:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def abort_all(self, message: str) -> None:
        """End every request still in flight: streams get the SSE error event,
        requests before their commit point a 503 the client may retry."""
        for ex in list(self._active):
            if ex.task is not None and not ex.task.done():
                ex.aborting = message
                ex.task.cancel()
        await self.wait_idle(5.0)

    # -- routing and retries -----------------------------------------------------

    def _upstream_headers(self, ex: Exchange) -> CIMultiDict[str]:
        request = ex.request
        headers = upstream_request_headers(
            request.headers,
            client_ip=request.remote,
            scheme=request.scheme,
            request_id=ex.request_id,
        )
        # The client's own key never goes upstream when the gateway checks keys.
        if self.gate.auth_enabled:
            headers.popall("Authorization", None)
        ex.client_authorization = headers.get("Authorization")
        headers.popall(POOL_HEADER, None)
        headers.popall(ADMIN_TOKEN_HEADER, None)
        return headers

    async def _forward(self, ex: Exchange, parsed: ParsedRequest) -> web.StreamResponse:
        request = ex.request
        runtime = parsed.runtime
        route = parsed.route
        ex.route = route.name
        ex.body = parsed.body or None
        gate = await self.gate.check(ex, parsed)
        ex.response_headers, ex.ticket, ex.strip_usage = gate.headers, gate.ticket, gate.strip_usage
        # Held by the exchange only (no local here): dropped at the commit point.
        ex.upstream_headers = self._upstream_headers(ex)
        key = sticky_key(route, request.headers, parsed.api_key, ex.client_ip)
        del parsed  # the body lives on in ex.body until the commit point
        target = gate.target_pool
        names = [target] if target is not None else self._pool_order(route, key)
        ex.span.set_route(route.name, names[0])
        plan = Plan([runtime.pools[n] for n in names], PickContext(key), self._metrics)
        primary = plan.primary
        primary.budget.record_request()
        try:
            return await self._one(ex, plan)
        except RetryableError as exc:
            error = exc
        retry_cfg = primary.config.retry

        def can_retry(exc: RetryableError) -> bool:
            if exc.kind == "ratelimited" and not retry_cfg.retry_on_429:
                return False
            return plan.has_next()

        budget = PlanBudget(plan, self._metrics)
        retrying = make_retrying(
            retry_cfg, budget, self._rng, max_attempts=plan.max_attempts - 1, can_retry=can_retry
        )
        # tenacity consults the budget between its own attempts; the first
        # retry (immediate: it goes to another backend) is checked here.
        if not can_retry(error) or not budget.try_spend():
            return self._give_up(ex, plan, error)
        try:
            async for attempt in retrying:
                with attempt:
                    self._metrics.retries.labels(ex.pool, error.kind).inc()
                    try:
                        return await self._one(ex, plan)
                    except RetryableError as exc:
                        error = exc
                        raise
        except RetryableError as exc:
            error = exc
        return self._give_up(ex, plan, error)

    def _one(self, ex: Exchange, plan: Plan) -> Coroutine[Any, Any, web.StreamResponse]:
        """Pick the next backend and start an attempt on it (a coroutine to
        await, not one of its own: an open stream then holds one frame less)."""
        picked = plan.next()
        if picked is None:
            if ex.attempts == 0:
                pool = plan.primary
                self._metrics.no_backend.labels(pool.name, "refused").inc()
                raise NoEligibleBackend(
                    f"no healthy backend for route '{ex.route}'",
                    headers={"Retry-After": str(pool.retry_after_s())},
                )
            raise RetryableError("connect", "no other backend to try", None, None)
        pool, backend, permit = picked
        ex.pool = pool.name
        ex.backend = backend.name
        ex.attempts += 1
        return self._attempt.run(ex, pool, backend, permit=permit)

    def _pool_order(self, route: RouteConfig, key: str | None) -> list[str]:
        """The split's choice first; then the route's other pools that carry
        weight (heaviest first), so a failed canary attempt lands on stable;
        then the route's fallback pools."""
        split = self._splits(route)
        first = choose_pool(split, key, self._rng)
        names = [first]
        if len(split) == 1 and not route.fallback:
            return names  # the common case: one pool, nothing to order
        for t in sorted(split, key=lambda t: -t.weight):
            if t.weight > 0 and t.pool not in names:
                names.append(t.pool)
        names += [p for p in route.fallback if p not in names]
        return names

    def _give_up(self, ex: Exchange, plan: Plan, error: RetryableError) -> web.StreamResponse:
        log.info(
            "request %s failed after %d attempt(s): %s %s",
            ex.request_id, ex.attempts, error.kind, error.detail,
        )  # fmt: skip
        if isinstance(error, StatusRetry):
            # The replica's own answer (e.g. its 503 with Retry-After) is the
            # most useful thing to pass on.
            resp = web.Response(status=error.status or 502, body=error.body, headers=error.headers)
            self._attempt.finish_headers(resp, ex)
            ex.status, ex.outcome, ex.error = resp.status, "upstream_error", error.detail
            return resp
        ex.error = error.detail
        if error.kind == "connect":
            # No backend could be reached at all (Envoy's 503 "upstream
            # connect error"): the client may come back shortly.
            raise NoEligibleBackend(
                f"upstream unavailable: {error.detail}",
                headers={"Retry-After": str(plan.primary.retry_after_s())},
            )
        if error.kind == "timeout":
            ex.outcome = "timeout"
            raise UpstreamTimeout(f"upstream timed out: {error.detail}")
        raise UpstreamError(f"upstream unavailable: {error.detail}")
