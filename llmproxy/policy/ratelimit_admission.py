"""What an admission decided, and the response headers OpenAI clients read.

OpenAI reports the state of its request and token limits on every response
(``x-ratelimit-limit-*``, ``-remaining-*``, ``-reset-*``); its SDKs read
``retry-after-ms`` and ``retry-after`` on a 429 to time the retry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmproxy.policy.ratelimit_store import BURST_S, Check


@dataclass(slots=True, eq=False)
class Ticket:
    """What :meth:`RateLimiter.settle` needs; settles at most once."""

    checks: Sequence[Check]
    estimated_tokens: int
    id: str
    settled: bool = False


def format_reset(seconds: float) -> str:
    """OpenAI's reset format ("20ms", "1s", "1.5s", "6m0s", "1h0m0s"),
    rounded up to the millisecond so a client never comes back too early."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


@dataclass(slots=True, eq=False)
class Admission:
    """The answer to one ``admit``. Allowed: serve the request, then settle
    ``ticket`` exactly once (a ``finally``; settling twice is harmless).
    Refused: answer 429 with :meth:`headers`, or 503 when ``rule`` is
    ``"store_unavailable"``; its ticket is already settled."""

    allowed: bool
    ticket: Ticket
    #: Metric label of the binding refusal: ``"{rule}:{requests|tokens|concurrent}"``
    #: (e.g. ``"api_key:requests"``) or ``"store_unavailable"``; None if allowed.
    rule: str | None = None
    retry_after_s: float = 0.0
    checks: Sequence[Check] = ()
    #: Per check, request then token backlog in seconds (see the store).
    backlog: Sequence[float] = ()
    refused_check: int = -1
    refused_dimension: str = ""

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` of the tightest rule per dimension (the refusing
        one for its dimension), and ``retry-after``/``retry-after-ms`` when
        refused. Rules without that limit contribute nothing; no rule, no header."""
        out: dict[str, str] = {}
        for pos, dim in ((0, "requests"), (1, "tokens")):
            best: tuple[float, float, float] | None = None
            for i, c in enumerate(self.checks):
                limit = c.requests_per_minute if pos == 0 else c.tokens_per_minute
                if limit <= 0:
                    continue
                backlog = self.backlog[2 * i + pos]
                remaining = max(0.0, math.floor((BURST_S - backlog) * limit / BURST_S + 1e-6))
                forced = i == self.refused_check and dim == self.refused_dimension
                if best is None or forced or remaining < best[1]:
                    best = (limit, remaining, backlog)
                if forced:
                    break
            if best is not None:
                out[f"x-ratelimit-limit-{dim}"] = _number(best[0])
                out[f"x-ratelimit-remaining-{dim}"] = str(int(best[1]))
                out[f"x-ratelimit-reset-{dim}"] = format_reset(best[2])
        if not self.allowed:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            out["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return out
