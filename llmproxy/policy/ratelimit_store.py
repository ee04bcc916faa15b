"""Rate-limit state: the store interface and the one-process memory store.

Both limits are token buckets kept in GCRA form: one number per bucket, its
*theoretical arrival time* (TAT), the instant at which the bucket would be
full again. A bucket of ``rate`` per minute holds ``rate`` units (the burst is
the per-minute amount, :data:`BURST_S` seconds of refill) and refills
continuously. Taking ``n`` units at ``now`` moves the TAT to
``max(TAT, now) + n * 60 / rate``; it fits while ``TAT' - now <= BURST_S``.
``TAT - now`` is the *backlog*: the seconds until the bucket is full again
(OpenAI's ``x-ratelimit-reset-*``); above ``BURST_S`` the bucket is in debt.

A store decides a whole request at once: every check is tested first and,
only if all pass, all are charged (check-then-commit), so a request refused
by one rule consumes nothing from the others. The memory store does this
without awaiting, which makes it atomic under asyncio; the Redis store does it
in one Lua script.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

#: Capacity of every bucket, in seconds of refill: a per-minute rate holds one
#: minute's worth.
BURST_S = 60.0
#: A request that fits to within this many seconds of refill is admitted, so
#: float rounding (Redis keeps absolute epoch seconds) never refuses the last
#: request of a burst.
EPS_S = 1e-4
#: ``retry_after_s`` when only ``max_concurrent`` refuses: a slot frees when
#: some request ends, which no store can predict.
CONCURRENCY_RETRY_S = 1.0


class StoreUnavailable(ConnectionError):
    """The store did not answer (in time); the limiter applies ``on_store_error``."""


@dataclass(slots=True)
class Check:
    """One rule applied to one request: which bucket, and the limits that hold
    for this request (per-key overrides already applied). 0 means no limit."""

    #: Stable rule name: the bucket namespace (so a limiter rebuilt on reload
    #: keeps the state of every rule that keeps its name) and the metric
    #: label's prefix.
    rule: str
    #: The value the rule keys on: key hash, IP, route, header value; "" for global.
    key: str
    requests_per_minute: float
    tokens_per_minute: float
    max_concurrent: int


class Decision(NamedTuple):
    #: Index into the checks of the binding refusal (largest wait); -1 if admitted.
    refused: int
    #: "requests", "tokens" or "concurrent" when refused, else "".
    dimension: str
    #: Seconds until a retry would pass every refusing check (0 when admitted).
    retry_after_s: float
    #: Per check, request then token backlog in seconds (``2 * len(checks)``
    #: values), after the charge when admitted, as found when refused.
    backlog: Sequence[float]


class RateLimitStore(Protocol):
    async def admit(self, checks: Sequence[Check], cost: int, ticket_id: str) -> Decision:
        """Test every check; if all pass, take one request, ``cost`` tokens and
        one concurrency slot (named ``ticket_id``) from each. Raises
        :class:`StoreUnavailable`."""
        ...

    async def settle(self, checks: Sequence[Check], delta_tokens: int, ticket_id: str) -> None:
        """Charge ``delta_tokens`` more (negative: refund) to the token buckets
        and release the concurrency slots taken at admission. A store that can
        fail must accept a ``ticket_id`` it never admitted (the limiter then
        releases the slots of an admission whose answer was lost). Raises
        :class:`StoreUnavailable`."""
        ...

    async def close(self) -> None: ...


def interval(per_minute: float) -> float:
    """Seconds of refill one unit costs; 0 for no limit."""
    return BURST_S / per_minute if per_minute > 0 else 0.0


class _State:
    __slots__ = ("inflight", "req", "tok")

    def __init__(self, now: float) -> None:
        self.req = now
        self.tok = now
        self.inflight = 0


class MemoryStore:
    """All state in one process, in one dict per rule name keyed by the rule's
    value. It never raises, so settlement can release slots by counting.

    A bucket that is full again and has nothing in flight is indistinguishable
    from one never seen, so :meth:`prune` (run from ``admit`` at most once per
    ``prune_interval_s``) drops it: memory follows the keys active within the
    last minute or so, not every key ever seen (FIELD-NOTES 6). ``clock`` is
    monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float], prune_interval_s: float = 30.0) -> None:
        self._clock = clock
        self._tables: dict[str, dict[str, _State]] = {}
        self._prune_interval_s = prune_interval_s
        self._next_prune = clock() + prune_interval_s

    def __len__(self) -> int:
        """Buckets held, for tests and the admin state."""
        return sum(len(t) for t in self._tables.values())

    def _table(self, rule: str) -> dict[str, _State]:
        table = self._tables.get(rule)
        if table is None:
            table = self._tables[rule] = {}
        return table

    async def admit(self, checks: Sequence[Check], cost: int, ticket_id: str) -> Decision:
        now = self._clock()
        if now >= self._next_prune:
            self.prune()
        n = len(checks)
        backlog = [0.0] * (2 * n)
        states: list[_State] = []
        refused, dimension, wait = -1, "", 0.0
        tables = self._tables
        for i, c in enumerate(checks):
            table = tables.get(c.rule) or self._table(c.rule)
            st = table.get(c.key)
            if st is None:  # a refused request leaves a full bucket: pruned later
                st = table[c.key] = _State(now)
            states.append(st)
            req = st.req if st.req > now else now
            tok = st.tok if st.tok > now else now
            backlog[2 * i] = req - now
            backlog[2 * i + 1] = tok - now
            if c.requests_per_minute > 0:
                w = req + BURST_S / c.requests_per_minute - now - BURST_S
                if w > EPS_S and w > wait:
                    refused, dimension, wait = i, "requests", w
            if c.tokens_per_minute > 0:
                w = tok + min(cost * BURST_S / c.tokens_per_minute, BURST_S) - now - BURST_S
                if w > EPS_S and w > wait:
                    refused, dimension, wait = i, "tokens", w
            if 0 < c.max_concurrent <= st.inflight and wait < CONCURRENCY_RETRY_S:
                refused, dimension, wait = i, "concurrent", CONCURRENCY_RETRY_S
        if refused >= 0:
            return Decision(refused, dimension, wait, backlog)
        for i, c in enumerate(checks):
            st = states[i]
            if c.requests_per_minute > 0:
                st.req = (st.req if st.req > now else now) + BURST_S / c.requests_per_minute
                backlog[2 * i] = st.req - now
            if c.tokens_per_minute > 0:
                st.tok = (st.tok if st.tok > now else now) + cost * BURST_S / c.tokens_per_minute
                backlog[2 * i + 1] = st.tok - now
            if c.max_concurrent > 0:
                st.inflight += 1
        return Decision(-1, "", 0.0, backlog)

    async def settle(self, checks: Sequence[Check], delta_tokens: int, ticket_id: str) -> None:
        now = self._clock()
        for c in checks:
            table = self._table(c.rule)
            st = table.get(c.key)
            if c.tokens_per_minute > 0 and delta_tokens != 0:
                if st is None:
                    if delta_tokens < 0:
                        continue  # pruned: already full, nothing to refund
                    st = table[c.key] = _State(now)
                charged = max(st.tok, now) + delta_tokens * BURST_S / c.tokens_per_minute
                st.tok = max(charged, now)
            if c.max_concurrent > 0 and st is not None and st.inflight > 0:
                st.inflight -= 1

    def prune(self) -> None:
        """Drop every bucket that is full and idle; O(buckets)."""
        now = self._clock()
        self._next_prune = now + self._prune_interval_s
        for table in self._tables.values():
            idle = [k for k, st in table.items() if st.inflight == 0 and max(st.req, st.tok) <= now]
            for k in idle:
                del table[k]

    async def close(self) -> None:
        self._tables.clear()
