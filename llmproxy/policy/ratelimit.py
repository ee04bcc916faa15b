"""Rate limits: admission and settlement of one request against every rule.

The request path calls :meth:`RateLimiter.admit` once, before choosing a
backend, and :meth:`RateLimiter.settle` once when the response has ended
(success, error or client gone). Each rule (``rate_limits.rules``) keys on
the API key hash, the client IP, the route, a header, or nothing (global);
a request that lacks the rule's value (no bearer token, no such header) is
not limited by that rule: pair such a rule with an ``ip`` or ``global`` one
to cover those requests. An empty header value is a value like any other.

Limits, per rule value (buckets and their GCRA arithmetic: :mod:`.ratelimit_store`):

* ``requests_per_minute`` R: a bucket of R requests refilled at R/60 a
  second, so R at once from full, then one every 60/R s. Over any W seconds
  at most R·(1 + W/60) requests are admitted.
* ``tokens_per_minute`` C: a bucket of C tokens. Admission pre-charges
  ``estimated_tokens`` E (prompt estimate + ``max_tokens``) and needs all of
  it to fit (an E above C fits only a full bucket); settlement refunds the
  unused part or charges the excess, which may leave the bucket in debt, and
  a bucket in debt refuses every request until it is repaid. Tokens are
  charged when a request starts, not after its stream ends (FIELD-NOTES 12).
  Guarantee: the tokens charged to a bucket within any W seconds (pre-charges
  plus settlement corrections) are at most C·(1 + W/60) + X, where X is the
  sum of the excesses (actual - E, when positive) of the requests that were
  in flight at the window's last admission, plus that admission's E - C if E
  exceeds C. When E counts ``max_tokens`` a generation cannot exceed its
  pre-charge, so X is at most the prompt's under-estimate; with one request
  in flight at a time it is at most one request's excess.
* ``max_concurrent``: requests admitted and not yet settled.

A request must pass every rule; one refused by any rule takes nothing from
the others. Per-key limits from the API-key config replace the values of the
``api_key`` rules for that key (with no ``api_key`` rule they still apply).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from llmproxy.config.schema import RateLimitRule, RateLimitsConfig
from llmproxy.policy.ratelimit_admission import Admission, Ticket, format_reset
from llmproxy.policy.ratelimit_redis import RedisStore
from llmproxy.policy.ratelimit_store import (
    Check,
    MemoryStore,
    RateLimitStore,
    StoreUnavailable,
)

__all__ = [
    "STORE_UNAVAILABLE",
    "Admission",
    "KeyLimits",
    "LimitRequest",
    "RateLimiter",
    "Ticket",
    "build_store",
    "compile_rules",
    "format_reset",
]

log = logging.getLogger(__name__)

#: ``retry_after_s`` of a refusal made because the store is unreachable (``deny``).
STORE_RETRY_S = 1.0
STORE_UNAVAILABLE = "store_unavailable"


class KeyLimits(Protocol):
    """Per-key limits as the API-key config holds them; ``None`` keeps the rule's."""

    @property
    def requests_per_minute(self) -> float | None: ...
    @property
    def tokens_per_minute(self) -> float | None: ...
    @property
    def max_concurrent(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class LimitRequest:
    #: SHA-256 hex of the bearer token (never the token itself).
    api_key_hash: str | None = None
    client_ip: str | None = None
    route: str | None = None
    #: At least the headers that ``header:NAME`` rules name, looked up by their
    #: lower-cased name (aiohttp's case-insensitive headers do).
    headers: Mapping[str, str] = field(default_factory=dict)
    key_limits: KeyLimits | None = None
    #: Prompt estimate + ``max_tokens``, pre-charged at admission.
    estimated_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    is_api_key: bool
    value: Callable[[LimitRequest], str | None]
    requests_per_minute: float
    tokens_per_minute: float
    max_concurrent: int


def _extractor(key: str) -> Callable[[LimitRequest], str | None]:
    if key.startswith("header:"):
        name = key.removeprefix("header:").lower()
        return lambda req: req.headers.get(name)
    if key == "global":
        return lambda req: ""
    fields = {"api_key": "api_key_hash", "ip": "client_ip", "route": "route"}
    if key not in fields:
        msg = f"unknown rate limit key {key!r} (known: {', '.join(fields)}, global, header:NAME)"
        raise ValueError(msg)
    getter: Callable[[LimitRequest], str | None] = attrgetter(fields[key])
    return getter


def compile_rules(rules: Sequence[RateLimitRule]) -> tuple[_Rule, ...]:
    """Name each rule (its ``name`` if the schema has one, else its key;
    repeats get ``#2``, ``#3``) and add a limitless ``api_key`` rule for
    per-key limits when the config has none."""
    out: list[_Rule] = []
    seen: dict[str, int] = {}
    for rule in rules:
        base = str(getattr(rule, "name", "") or rule.key)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}#{seen[base]}"
        out.append(
            _Rule(
                name,
                rule.key == "api_key",
                _extractor(rule.key),
                rule.requests_per_minute or 0.0,
                rule.tokens_per_minute or 0.0,
                rule.max_concurrent or 0,
            )
        )
    if not any(r.is_api_key for r in out):
        name = "api_key" if "api_key" not in seen else "api_key#key"
        out.append(_Rule(name, True, _extractor("api_key"), 0.0, 0.0, 0))
    return tuple(out)


class RateLimiter:
    """Admits requests against ``config.rules``; see the module docstring.

    ``on_store_error`` is called on every store failure (wire it to a metric);
    the log line is written at most once per ``log_interval_s`` of ``clock``.
    """

    def __init__(
        self,
        config: RateLimitsConfig,
        store: RateLimitStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_store_error: Callable[[], None] | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        self._rules = compile_rules(config.rules)
        self._deny = config.on_store_error == "deny"
        self._store = store
        self._clock = clock
        self._on_store_error = on_store_error
        self._log_interval_s = log_interval_s
        self._next_log = float("-inf")
        self._unlogged = 0
        self._noop = Ticket((), 0, "", settled=True)
        self._ids = itertools.count()
        self._instance = os.urandom(6).hex()

    def _checks(self, req: LimitRequest) -> list[Check]:
        checks: list[Check] = []
        over = req.key_limits
        for r in self._rules:
            key = r.value(req)
            if key is None:
                continue
            rpm, tpm, conc = r.requests_per_minute, r.tokens_per_minute, r.max_concurrent
            if r.is_api_key and over is not None:
                if over.requests_per_minute is not None:
                    rpm = over.requests_per_minute
                if over.tokens_per_minute is not None:
                    tpm = over.tokens_per_minute
                if over.max_concurrent is not None:
                    conc = over.max_concurrent
            if rpm > 0 or tpm > 0 or conc > 0:
                checks.append(Check(r.name, key, rpm, tpm, conc))
        return checks

    async def admit(self, req: LimitRequest) -> Admission:
        checks = self._checks(req)
        if not checks:
            return Admission(True, self._noop)
        cost = max(0, req.estimated_tokens)
        ticket_id = f"{self._instance}:{next(self._ids)}"
        try:
            d = await self._store.admit(checks, cost, ticket_id)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            if self._deny:
                return Admission(False, self._noop, STORE_UNAVAILABLE, STORE_RETRY_S)
            return Admission(True, self._release_only(checks, ticket_id))
        if d.refused >= 0:
            label = f"{checks[d.refused].rule}:{d.dimension}"
            return Admission(
                False, self._noop, label, d.retry_after_s, checks, d.backlog, d.refused, d.dimension
            )
        return Admission(True, Ticket(checks, cost, ticket_id), None, 0.0, checks, d.backlog)

    def _release_only(self, checks: list[Check], ticket_id: str) -> Ticket:
        """For an admission the store failed to answer: if the store did take
        the slots (only the answer was lost), settling frees them; no token
        is charged or refunded."""
        conc = [Check(c.rule, c.key, 0.0, 0.0, c.max_concurrent) for c in checks]
        conc = [c for c in conc if c.max_concurrent > 0]
        return Ticket(conc, 0, ticket_id) if conc else self._noop

    async def settle(self, ticket: Ticket, actual_tokens: int | None = None) -> None:
        """Settle once: charge ``actual_tokens`` instead of the pre-charge
        (None keeps the pre-charge) and free the concurrency slots. Later
        calls, and calls for refused admissions, do nothing."""
        if ticket.settled:
            return
        ticket.settled = True
        delta = 0 if actual_tokens is None else max(0, actual_tokens) - ticket.estimated_tokens
        if not any(
            (delta and c.tokens_per_minute > 0) or c.max_concurrent > 0 for c in ticket.checks
        ):
            return
        try:
            await self._store.settle(ticket.checks, delta, ticket.id)
        except StoreUnavailable as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: StoreUnavailable) -> None:
        if self._on_store_error is not None:
            self._on_store_error()
        self._unlogged += 1
        now = self._clock()
        if now >= self._next_log:
            log.warning(
                "rate limit store unavailable (%s); %s requests; %d store errors since last report",
                exc,
                "refusing" if self._deny else "admitting",
                self._unlogged,
            )
            self._unlogged = 0
            self._next_log = now + self._log_interval_s

    async def close(self) -> None:
        await self._store.close()


def build_store(
    config: RateLimitsConfig, clock: Callable[[], float] = time.monotonic
) -> RateLimitStore:
    """``memory`` or ``redis://...``."""
    if config.store == "memory":
        return MemoryStore(clock)
    prefix = config.key_prefix if config.key_prefix.endswith(":") else config.key_prefix + ":"
    return RedisStore(
        config.store, timeout_s=config.redis_timeout_s, key_prefix=prefix, clock=clock
    )
