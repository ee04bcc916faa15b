"""Automatic canary analysis: compare a route's canary pool with its stable pool.

Pure: no I/O, no logging, time comes in as arguments (``now``) or from the
injected ``clock`` (operator actions only; ``now`` must be read from the
same clock, a monotonic one). The caller feeds every request
outcome of the route's pools to ``record``, calls ``evaluate`` periodically,
applies ``Verdict.weight`` to the route's split (``apply_weight``) and logs or
counts a verdict whose ``changed`` is true.

Window: ``_SLOTS`` time buckets of ``window_s / _SLOTS`` each; the current
bucket and the ones before it, so ``evaluate`` sees between 11/12 of
``window_s`` and all of it (55 to 60 s for 60 s). ``record`` is O(1).

TTFB p95: a log-spaced histogram per bucket, 8 buckets per doubling from 1 ms
(the top bucket, from about 17 min, also takes anything slower). The p95 is
reported as the upper edge of the bucket holding it, so it reads high by less
than 9.05 %, and a ratio of two p95s is within a factor 1.0905 of the true one.
The latency check runs only when both sides have ``min_samples`` TTFBs.

States: ``insufficient_data`` (fewer than ``min_samples`` outcomes on either
side; the weight is kept), ``observing`` (within margins, nothing to promote),
``promoting`` (within margins, the next step waits for its time),
``rolled_back`` (weight 0, kept until ``reset`` or ``promote``) and
``promoted`` (weight 100 reached; analysis stops, as the stable pool no longer
gets traffic to compare with, until ``reset``). Steps that end below 100 stop
at their last step in ``observing``, still guarded by rollback.

``promote()`` jumps straight to 100 % (for blue-green, that is the switch);
to resume stepping from a given weight instead, use ``reset(weight)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

# CanaryConfig lives in the schema (``routes[i].canary``); re-exported from here.
from llmproxy.config.schema import CanaryConfig as CanaryConfig  # noqa: PLC0414 - re-export
from llmproxy.config.schema import SplitTarget

CanaryState = Literal["observing", "promoting", "rolled_back", "promoted", "insufficient_data"]

_SLOTS = 12
_TTFB_MIN_S = 0.001
_PER_DOUBLING = 8
_TTFB_BUCKETS = 20 * _PER_DOUBLING + 1


@dataclass(frozen=True, slots=True)
class Verdict:
    state: CanaryState
    reason: str
    #: The canary's weight now, percent of the route's traffic.
    weight: float
    #: This call changed the weight: apply it, and log and count the reason.
    changed: bool


@dataclass(frozen=True, slots=True)
class WindowStats:
    requests: int
    errors: int
    error_rate: float | None
    ttfb_samples: int
    ttfb_p95_s: float | None


@dataclass(frozen=True, slots=True)
class CanarySnapshot:
    """For the admin state; ``dataclasses.asdict`` makes it JSON-ready."""

    state: CanaryState
    weight: float
    reason: str
    canary: WindowStats
    stable: WindowStats
    rolled_back_at: float | None
    next_step_at: float | None


def canary_problems(cfg: CanaryConfig, pools: Sequence[str]) -> list[tuple[str, str]]:
    """``(key, message)`` for each mistake; ``pools`` are the route's split pools."""
    problems: list[tuple[str, str]] = []
    for key, pool in (("canary_pool", cfg.canary_pool), ("stable_pool", cfg.stable_pool)):
        if pool not in pools:
            problems.append((key, f"pool {pool!r} is not in the route's split"))
    if cfg.canary_pool == cfg.stable_pool:
        problems.append(("stable_pool", "must differ from canary_pool"))
    if any(not 0 < s <= 100 for s in cfg.steps):
        problems.append(("steps", "each step must be a percentage in (0, 100]"))
    elif any(a >= b for a, b in zip(cfg.steps, cfg.steps[1:], strict=False)):
        problems.append(("steps", "steps must rise strictly"))
    if cfg.max_ttfb_p95_ratio < 1:
        problems.append(("max_ttfb_p95_ratio", "must be at least 1"))
    return problems


def _ttfb_bucket(ttfb_s: float) -> int:
    if ttfb_s <= _TTFB_MIN_S:
        return 0
    index = math.ceil(math.log2(ttfb_s / _TTFB_MIN_S) * _PER_DOUBLING)
    return min(index, _TTFB_BUCKETS - 1)


def _bucket_edge(index: int) -> float:
    return float(_TTFB_MIN_S * 2.0 ** (index / _PER_DOUBLING))


class _Window:
    """Outcomes of one pool in a ring of ``_SLOTS`` time buckets."""

    __slots__ = ("_epochs", "_errors", "_requests", "_ttfb", "_width")

    def __init__(self, window_s: float) -> None:
        self._width = window_s / _SLOTS
        self._epochs = [-1] * _SLOTS
        self._requests = [0] * _SLOTS
        self._errors = [0] * _SLOTS
        self._ttfb: list[dict[int, int]] = [{} for _ in range(_SLOTS)]

    def record(self, ok: bool, ttfb_s: float | None, now: float) -> None:
        epoch = math.floor(now / self._width)
        slot = epoch % _SLOTS
        if self._epochs[slot] != epoch:
            if self._epochs[slot] > epoch:
                return  # Older than the window already: drop it.
            self._epochs[slot] = epoch
            self._requests[slot] = self._errors[slot] = 0
            self._ttfb[slot] = {}
        self._requests[slot] += 1
        self._errors[slot] += not ok
        if ttfb_s is not None:
            bucket = _ttfb_bucket(ttfb_s)
            self._ttfb[slot][bucket] = self._ttfb[slot].get(bucket, 0) + 1

    def stats(self, now: float) -> WindowStats:
        current = math.floor(now / self._width)
        requests = errors = 0
        hist = [0] * _TTFB_BUCKETS
        for slot, epoch in enumerate(self._epochs):
            if current - _SLOTS < epoch <= current:
                requests += self._requests[slot]
                errors += self._errors[slot]
                for bucket, count in self._ttfb[slot].items():
                    hist[bucket] += count
        samples = sum(hist)
        p95: float | None = None
        if samples:
            rank, seen = math.ceil(0.95 * samples), 0
            for bucket, count in enumerate(hist):
                seen += count
                if seen >= rank:
                    p95 = _bucket_edge(bucket)
                    break
        rate = errors / requests if requests else None
        return WindowStats(requests, errors, rate, samples, p95)


class CanaryAnalyzer:
    """The canary of one route: its weight, and why it has that weight."""

    def __init__(
        self,
        cfg: CanaryConfig,
        clock: Callable[[], float],
        *,
        initial_weight: float | None = None,
    ) -> None:
        """``initial_weight`` defaults to the first step; without steps it is required."""
        problems = canary_problems(cfg, (cfg.canary_pool, cfg.stable_pool))
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
        if initial_weight is None:
            if not cfg.steps:
                raise ValueError("initial_weight is required when there are no steps")
            initial_weight = cfg.steps[0]
        self._cfg = cfg
        self._clock = clock
        self._initial = _check_percent(initial_weight)
        self._canary = _Window(cfg.window_s)
        self._stable = _Window(cfg.window_s)
        self._weight = self._initial
        self._state: CanaryState = "insufficient_data"
        self._reason = "no outcomes yet"
        self._rolled_back_at: float | None = None
        self._step_started_at = clock()

    @property
    def weight(self) -> float:
        return self._weight

    def record(self, pool: str, ok: bool, ttfb_s: float | None, now: float) -> None:
        """One request outcome; pools other than the canary and stable are ignored."""
        if pool == self._cfg.canary_pool:
            self._canary.record(ok, ttfb_s, now)
        elif pool == self._cfg.stable_pool:
            self._stable.record(ok, ttfb_s, now)

    def evaluate(self, now: float) -> Verdict:
        cfg = self._cfg
        if self._state in ("rolled_back", "promoted"):
            return self._verdict(changed=False)
        if not cfg.enabled:
            return self._set("observing", "automatic canary analysis is disabled")
        canary, stable = self._canary.stats(now), self._stable.stats(now)
        n = f"over {cfg.window_s:g}s, n={canary.requests}/{stable.requests}"
        if canary.requests < cfg.min_samples or stable.requests < cfg.min_samples:
            return self._set(
                "insufficient_data", f"need {cfg.min_samples} outcomes on each side, {n}"
            )
        failure = self._failure(canary, stable)
        if failure is not None:
            self._rolled_back_at = now
            return self._set("rolled_back", f"{failure} {n}", 0.0)
        within = f"canary within margins {n}"
        step = self._next_step()
        if step is None:
            done = bool(cfg.steps) and self._weight >= 100
            return self._set("promoted" if done else "observing", within)
        due = self._step_started_at + cfg.step_interval_s
        if now < due:
            return self._set("promoting", f"{within}; next step {step:g}% at t={due:g}")
        self._step_started_at = now
        if step >= 100:
            return self._set("promoted", f"promoted to 100%, {within}", step)
        return self._set("promoting", f"advanced to {step:g}%, {within}", step)

    def rollback(self, reason: str = "") -> Verdict:
        """Operator action: weight 0 at once, kept until ``reset`` or ``promote``."""
        self._rolled_back_at = self._clock()
        text = f"rolled back by an operator: {reason}" if reason else "rolled back by an operator"
        return self._set("rolled_back", text, 0.0)

    def promote(self) -> Verdict:
        """Operator action: 100 % at once (``promoted``); analysis stops until ``reset``."""
        self._rolled_back_at = None
        return self._set("promoted", "promoted by an operator", 100.0)

    def reset(self, weight: float | None = None) -> Verdict:
        """Operator action: back to ``weight`` (default: the initial one), analysing afresh.

        The canary's window is cleared, so its old failures cannot roll it back again.
        """
        self._canary = _Window(self._cfg.window_s)
        self._rolled_back_at = None
        self._step_started_at = self._clock()
        target = self._initial if weight is None else _check_percent(weight)
        return self._set("insufficient_data", f"reset by an operator to {target:g}%", target)

    def snapshot(self, now: float | None = None) -> CanarySnapshot:
        at = self._clock() if now is None else now
        next_at = None
        stepping = self._state not in ("rolled_back", "promoted") and self._cfg.enabled
        if stepping and self._next_step() is not None:
            next_at = self._step_started_at + self._cfg.step_interval_s
        return CanarySnapshot(
            state=self._state,
            weight=self._weight,
            reason=self._reason,
            canary=self._canary.stats(at),
            stable=self._stable.stats(at),
            rolled_back_at=self._rolled_back_at,
            next_step_at=next_at,
        )

    def _failure(self, canary: WindowStats, stable: WindowStats) -> str | None:
        cfg = self._cfg
        c_rate, s_rate = canary.error_rate or 0.0, stable.error_rate or 0.0
        if c_rate - s_rate > cfg.max_error_rate_increase:
            return (
                f"canary error rate {c_rate:.1%} vs stable {s_rate:.1%}"
                f" (+{c_rate - s_rate:.1%} > +{cfg.max_error_rate_increase:.1%})"
            )
        enough = min(canary.ttfb_samples, stable.ttfb_samples) >= cfg.min_samples
        c_p95, s_p95 = canary.ttfb_p95_s, stable.ttfb_p95_s
        if enough and c_p95 is not None and s_p95 is not None:
            ratio = c_p95 / s_p95
            if ratio > cfg.max_ttfb_p95_ratio:
                return (
                    f"canary TTFB p95 {c_p95:.3f}s vs stable {s_p95:.3f}s"
                    f" ({ratio:.2f}x > {cfg.max_ttfb_p95_ratio:.2f}x)"
                )
        return None

    def _next_step(self) -> float | None:
        return next((s for s in self._cfg.steps if s > self._weight), None)

    def _set(self, state: CanaryState, reason: str, weight: float | None = None) -> Verdict:
        changed = weight is not None and weight != self._weight
        if weight is not None:
            self._weight = weight
        self._state, self._reason = state, reason
        return self._verdict(changed=changed)

    def _verdict(self, *, changed: bool) -> Verdict:
        return Verdict(self._state, self._reason, self._weight, changed)


def _check_percent(weight: float) -> float:
    if not 0 <= weight <= 100:
        raise ValueError(f"a canary weight is a percentage in [0, 100], got {weight}")
    return float(weight)


def canary_percent(split: Sequence[SplitTarget], canary_pool: str) -> float:
    """The canary's share of a split, in percent (its weight without steps)."""
    total = sum(t.weight for t in split)
    share = sum(t.weight for t in split if t.pool == canary_pool)
    return 100.0 * share / total if total > 0 else 0.0


def apply_weight(
    split: Sequence[SplitTarget], canary_pool: str, percent: float
) -> tuple[SplitTarget, ...]:
    """``split`` with the canary at ``percent``; the others share the rest in proportion.

    Pass the configured split, not one this returned: at 100 % the others'
    proportions are lost (then they share equally). The order is kept, so
    sticky users keep their split points.
    """
    percent = _check_percent(percent)
    others = [t for t in split if t.pool != canary_pool]
    if len(others) == len(split):
        raise ValueError(f"pool {canary_pool!r} is not in the split")
    if not others:
        raise ValueError(f"the split has no pool besides the canary {canary_pool!r}")
    total = sum(t.weight for t in others)
    rest = 100.0 - percent
    return tuple(
        SplitTarget(t.pool, percent)
        if t.pool == canary_pool
        else SplitTarget(t.pool, rest * t.weight / total if total > 0 else rest / len(others))
        for t in split
    )
