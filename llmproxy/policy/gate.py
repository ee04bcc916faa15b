"""Admission policy on the request path: who may ask (API keys), how much
(rate limits), and whether the caller may pick the pool itself.

It runs after the route is matched and before a backend is chosen. Every
refusal is an OpenAI-shaped error: 401 for a missing or wrong key, 403 for a
pool override the caller may not make, 429 with ``Retry-After`` and the
``x-ratelimit-*`` headers OpenAI clients read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from llmproxy.config.schema import Config
from llmproxy.errors import BadRequest, NotFound, ProxyError, Unauthorized
from llmproxy.observability.metrics import Metrics
from llmproxy.policy.auth import ApiKey, KeyRing, hash_key
from llmproxy.policy.ratelimit import Admission, LimitRequest, RateLimiter, Ticket
from llmproxy.upstream.exchange import Exchange
from llmproxy.upstream.request import ParsedRequest

log = logging.getLogger(__name__)

#: A caller allowed to (an admin, or a key with ``can_target_pool``) names the
#: pool with this header, e.g. to smoke-test a canary before it gets traffic.
POOL_HEADER = "x-llmproxy-pool"
#: The admin token may be presented here for a pool override.
ADMIN_TOKEN_HEADER = "x-llmproxy-admin-token"

#: Characters per token for the prompt estimate (OpenAI's rule of thumb).
_CHARS_PER_TOKEN = 4
#: Completion tokens pre-charged when the request sets no max_tokens.
DEFAULT_MAX_TOKENS = 1024


class Forbidden(ProxyError, PermissionError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class StoreUnavailableError(ProxyError):
    status = 503
    type = "server_error"
    code = "rate_limit_store_unavailable"


@dataclass(slots=True)
class GateResult:
    api_key: ApiKey | None = None
    #: The pool the caller asked for with the override header.
    target_pool: str | None = None
    ticket: Ticket | None = None
    #: x-ratelimit-* headers for the response.
    headers: dict[str, str] | None = None
    #: The client asked for a stream without usage; we asked the replica for
    #: it (token settlement) and must strip it from what the client sees.
    strip_usage: bool = False


class GateKeeper:
    def __init__(
        self,
        config: Config,
        limiter: RateLimiter | None,
        metrics: Metrics,
    ) -> None:
        self._keyring = KeyRing(config.auth)
        self._limiter = limiter
        self._metrics = metrics
        self._admin_token = config.admin.token
        self._settling: set[asyncio.Task[None]] = set()
        self._counts_tokens = limiter is not None and (
            any(r.tokens_per_minute for r in config.rate_limits.rules)
            or any(k.tokens_per_minute for k in config.auth.keys)
        )

    @property
    def auth_enabled(self) -> bool:
        return self._keyring.enabled

    async def check(self, ex: Exchange, parsed: ParsedRequest) -> GateResult:
        request = ex.request
        result = GateResult()
        if self._keyring.enabled:
            key = self._keyring.authenticate(request.headers.get("Authorization"))
            if key is None:
                raise Unauthorized(
                    "Incorrect API key provided. "
                    "Pass a valid key as 'Authorization: Bearer <key>'.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            result.api_key = key
            ex.api_key_name = key.name
        target = request.headers.get(POOL_HEADER)
        if target is not None:
            self._check_override(ex, parsed, result, target)
        if self._limiter is not None:
            await self._admit(ex, parsed, result)
        return result

    def _check_override(
        self, ex: Exchange, parsed: ParsedRequest, result: GateResult, target: str
    ) -> None:
        given = ex.request.headers.get(ADMIN_TOKEN_HEADER, "")
        is_admin = self._admin_token is not None and hmac.compare_digest(
            given.encode(), self._admin_token.encode()
        )
        allowed = is_admin or (result.api_key is not None and result.api_key.can_target_pool)
        if not allowed:
            raise Forbidden(f"'{POOL_HEADER}' needs the admin token or a key allowed to use it")
        if target not in parsed.runtime.pools:
            raise NotFound(f"no pool '{target}'")
        result.target_pool = target

    async def _admit(self, ex: Exchange, parsed: ParsedRequest, result: GateResult) -> None:
        assert self._limiter is not None
        request = ex.request
        estimated = 0
        if self._counts_tokens:
            estimated, result.strip_usage = self._estimate_and_ask_usage(ex, parsed)
        token = parsed.api_key
        key_hash = result.api_key.sha256 if result.api_key else (hash_key(token) if token else None)
        admission = await self._limiter.admit(
            LimitRequest(
                api_key_hash=key_hash,
                client_ip=ex.client_ip,
                route=parsed.route.name,
                headers=request.headers,
                key_limits=result.api_key.limits if result.api_key else None,
                estimated_tokens=estimated,
            )
        )
        headers = admission.headers()
        if not admission.allowed:
            self._refuse(admission, headers)
        result.ticket = admission.ticket
        result.headers = headers or None

    def _refuse(self, admission: Admission, headers: dict[str, str]) -> None:
        rule = admission.rule or "unknown"
        self._metrics.ratelimited.labels(rule).inc()
        retry = str(max(1, math.ceil(admission.retry_after_s)))
        if rule == "store_unavailable":
            raise StoreUnavailableError(
                "rate limit store unavailable; try again shortly", headers={"Retry-After": retry}
            )
        if not any(k.lower() == "retry-after" for k in headers):
            headers = {**headers, "Retry-After": retry}
        raise RateLimited(
            f"Rate limit reached ({rule}). Please try again in {retry}s.", headers=headers
        )

    def _estimate_and_ask_usage(self, ex: Exchange, parsed: ParsedRequest) -> tuple[int, bool]:
        """Prompt estimate + max_tokens; and, for a stream that does not ask for
        usage, ask the replica for it (rewriting the body) so the tokens can be
        settled exactly."""
        doc = _json_object(parsed.body)
        if doc is None:
            return 0, False
        prompt_chars = len(json.dumps(doc.get("messages", doc.get("prompt", ""))))
        max_tokens = doc.get("max_completion_tokens") or doc.get("max_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise BadRequest("'max_tokens' must be a non-negative integer")
        estimate = prompt_chars // _CHARS_PER_TOKEN + max_tokens
        opts = doc.get("stream_options")
        wants_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        if doc.get("stream") is True and not wants_usage:
            doc["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
            ex.body = json.dumps(doc).encode()
            return estimate, True
        return estimate, False

    def settle(self, ex: Exchange, ticket: Ticket) -> None:
        """Finish hook: settle with the actual usage (off the request's task)."""
        if self._limiter is None or ticket.settled:
            return
        used = None
        if ex.prompt_tokens is not None and ex.completion_tokens is not None:
            used = ex.prompt_tokens + ex.completion_tokens
        task = asyncio.get_running_loop().create_task(self._limiter.settle(ticket, used))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self._limiter is not None:
            await self._limiter.close()


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None
