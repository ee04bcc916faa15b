"""Retry control for the forwarder: which failures are retried, how long to
wait between attempts, and when to stop — built on tenacity.

Only a :class:`RetryableError` (an attempt that failed before the commit
point) is retried; anything else propagates unchanged. Before each retry the
caller's ``can_retry`` predicate and then the pool's :class:`RetryBudget` are
consulted, in that order, so the budget is only spent on retries that would
really be made.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, Protocol

import tenacity

from llmproxy.config.schema import RetryConfig


class Budget(Protocol):
    """What the retry loop asks before each retry (a :class:`RetryBudget`, or
    one that picks the budget of the pool the retry goes to)."""

    def try_spend(self) -> bool: ...


class RetryableError(Exception):
    """An attempt failed before the commit point; another backend may serve it.

    ``kind``: "connect", "timeout", "status" (502/503/504) or "ratelimited"
    (a backend's 429). ``retry_after_s`` is the backend's ``Retry-After`` in
    seconds, if it sent one; ``status`` the backend's HTTP status, if any.
    ``budget_exhausted`` is set on the error that ends the retries when the
    retry budget refused the next one.
    """

    def __init__(
        self,
        kind: str,
        detail: str,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.status = status
        self.budget_exhausted = False


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an
    HTTP-date (relative to ``now_epoch``, Unix seconds). Past dates and
    negative delays give 0; a missing or unreadable value gives None."""
    if value is None or not (text := value.strip()):
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, origin unknown (RFC 5322)
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)


class JitteredBackoff(tenacity.wait.wait_base):
    """Exponential backoff with full jitter, from an injected RNG.

    After failed attempt ``n`` (1-based) the wait is uniform in
    ``[0, min(backoff_max_s, backoff_base_s * 2**(n-1))]`` — tenacity's own
    jittered waits draw from the global ``random`` module, so tests could not
    make them exact. A ``Retry-After`` on the failed attempt's error replaces
    it: ``min(retry_after_s, retry_after_max_s)``, not jittered.
    """

    def __init__(self, cfg: RetryConfig, rng: random.Random) -> None:
        self._base = cfg.backoff_base_s
        self._cap = cfg.backoff_max_s
        self._retry_after_max = cfg.retry_after_max_s
        self._rng = rng

    def ceiling(self, attempt_number: int) -> float:
        """Largest jittered wait after failed attempt ``attempt_number``."""
        return min(self._cap, self._base * 2.0 ** min(attempt_number - 1, 64))

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(exc, RetryableError) and exc.retry_after_s is not None:
            return max(0.0, min(exc.retry_after_s, self._retry_after_max))
        return self._rng.uniform(0.0, self.ceiling(retry_state.attempt_number))


def backoff_wait(cfg: RetryConfig, rng: random.Random) -> tenacity.wait.wait_base:
    return JitteredBackoff(cfg, rng)


class _StopPolicy(tenacity.stop.stop_base):
    """Stop after ``max_attempts``, or when a 429 is not to be retried, or when
    ``can_retry`` says no, or when the budget is spent (flagged on the error)."""

    def __init__(
        self,
        cfg: RetryConfig,
        budget: Budget,
        max_attempts: int,
        can_retry: Callable[[RetryableError], bool],
        on_budget_exhausted: Callable[[], None] | None,
    ) -> None:
        self._retry_on_429 = cfg.retry_on_429
        self._budget = budget
        self._max_attempts = max_attempts
        self._can_retry = can_retry
        self._on_budget_exhausted = on_budget_exhausted

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if not isinstance(exc, RetryableError):
            return True
        if retry_state.attempt_number >= self._max_attempts:
            return True
        if exc.kind == "ratelimited" and not self._retry_on_429:
            return True
        if not self._can_retry(exc):
            return True
        if not self._budget.try_spend():
            exc.budget_exhausted = True
            if self._on_budget_exhausted is not None:
                self._on_budget_exhausted()
            return True
        return False


class _Retrying(tenacity.AsyncRetrying):
    """AsyncRetrying that can start as if attempt 1 had already failed.

    Seeds tenacity's per-iteration ``_retry_state`` (set by ``__aiter__``)
    with that failure; the unit tests pin this to the installed tenacity.
    """

    def __init__(self, first_error: RetryableError | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._first_error = first_error

    def __aiter__(self) -> tenacity.AsyncRetrying:
        it = super().__aiter__()
        seed, self._first_error = self._first_error, None
        if seed is not None:
            self._retry_state.set_exception((type(seed), seed, seed.__traceback__))
        return it


def make_retrying(
    cfg: RetryConfig,
    budget: Budget,
    rng: random.Random,
    *,
    max_attempts: int,
    can_retry: Callable[[RetryableError], bool],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    first_error: RetryableError | None = None,
    on_budget_exhausted: Callable[[], None] | None = None,
) -> tenacity.AsyncRetrying:
    """The retry loop for one client request; use it once.

    ``max_attempts`` counts every attempt, the first included. With
    ``first_error`` the loop starts as if attempt 1 had already failed with
    it (the forwarder makes its first attempt directly, with no tenacity
    object on the hot path): the first iteration is attempt 2, after the
    checks and the backoff. Without it, the loop makes attempt 1 itself,
    with no check or wait before it: a caller that has already checked the
    first retry itself passes the attempts left as ``max_attempts``.

    When it stops, the last :class:`RetryableError` propagates (never
    ``tenacity.RetryError``), with ``budget_exhausted`` set if the budget
    refused (and ``on_budget_exhausted()`` called, e.g. to count it). Other
    exceptions, cancellation included, propagate at once.

    Example (the forwarder)::

        try:
            return await one_attempt()
        except RetryableError as exc:
            retrying = make_retrying(
                cfg, pool.budget, rng, max_attempts=cfg.attempts,
                can_retry=lambda e: plan.has_next(), first_error=exc,
            )
        async for attempt in retrying:
            with attempt:
                result = await one_attempt()
        return result
    """
    return _Retrying(
        first_error,
        sleep=sleep,
        stop=_StopPolicy(cfg, budget, max_attempts, can_retry, on_budget_exhausted),
        wait=backoff_wait(cfg, rng),
        retry=tenacity.retry_if_exception_type(RetryableError),
        reraise=True,
    )
