"""The Redis rate-limit store: one budget shared by every gateway instance.

Each decision is one ``EVALSHA`` of a Lua script that reads, tests and (only
if every check passes) charges all the buckets of a request atomically, with
Redis's own ``TIME``, so gateways whose clocks disagree still agree on the
buckets. The arithmetic is the memory store's (:mod:`.ratelimit_store`).

Keys, per rule and rule value (the value is hashed, so keys have a bounded
length and carry no header value or address):

* ``{prefix}{rule}:{digest}`` — a hash: ``r`` and ``t``, the request and token
  TATs in epoch seconds. It expires once the buckets would be full again.
* ``{prefix}{rule}:{digest}:c`` — a sorted set of the tickets in flight, each
  scored with its lease expiry. Expired tickets are removed by the next
  admission, so a gateway that dies without settling holds its slots for at
  most ``lease_s``; a request that outlives ``lease_s`` loses its slot early.

All keys of one request go to one script, so on Redis Cluster the prefix must
carry a hash tag (e.g. ``{llmproxy}:rl:``).

Every call is bounded by ``timeout_s`` (waiting for one of at most
``max_connections`` pooled connections, connecting, and the answer) with no
retry; after a failure the store fails fast for ``backoff_s`` instead of
making each request wait for a dead server, then tries again: the pool
reconnects, and a script lost with a restart is loaded again by redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from llmproxy.policy.ratelimit_store import (
    BURST_S,
    CONCURRENCY_RETRY_S,
    EPS_S,
    Check,
    Decision,
    StoreUnavailable,
    interval,
)

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local function keep(key, r, k)
  redis.call('HSET', key, 'r', fmt(r), 't', fmt(k))
  redis.call('PEXPIRE', key, math.ceil((math.max(r, k) - now) * 1000) + 1000)
end
"""

#: KEYS: per check, state hash then slot set. ARGV: cost, ticket, lease_s,
#: burst_s, eps_s, concurrency wait, then per check: request interval, token
#: interval, max_concurrent (0 = none).
_ADMIT = (
    _PRELUDE
    + """
local cost, member, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local burst, eps, cwait = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n = #KEYS / 2
local req, tok, rs, ts, ms = {}, {}, {}, {}, {}
local refused, dim, wait = 0, 0, 0
for i = 1, n do
  local a = 3 * i + 4
  local ri, ti, mc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  rs[i], ts[i], ms[i] = ri, ti, mc
  local st = redis.call('HMGET', KEYS[2 * i - 1], 'r', 't')
  req[i] = math.max(tonumber(st[1]) or now, now)
  tok[i] = math.max(tonumber(st[2]) or now, now)
  if ri > 0 then
    local w = req[i] + ri - now - burst
    if w > eps and w > wait then refused, dim, wait = i, 1, w end
  end
  if ti > 0 then
    local w = tok[i] + math.min(cost * ti, burst) - now - burst
    if w > eps and w > wait then refused, dim, wait = i, 2, w end
  end
  if mc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now)
    if redis.call('ZCARD', KEYS[2 * i]) >= mc and wait < cwait then
      refused, dim, wait = i, 3, cwait
    end
  end
end
if refused == 0 then
  for i = 1, n do
    local ri, ti, mc = rs[i], ts[i], ms[i]
    if ri > 0 then req[i] = req[i] + ri end
    if ti > 0 then tok[i] = tok[i] + cost * ti end
    if ri > 0 or ti > 0 then keep(KEYS[2 * i - 1], req[i], tok[i]) end
    if mc > 0 then
      redis.call('ZADD', KEYS[2 * i], fmt(now + lease), member)
      redis.call('PEXPIRE', KEYS[2 * i], math.ceil(lease * 1000) + 1000)
    end
  end
end
local out = {refused, dim, fmt(wait)}
for i = 1, n do
  out[#out + 1] = fmt(req[i] - now)
  out[#out + 1] = fmt(tok[i] - now)
end
return out
"""
)

#: KEYS as for admission. ARGV: ticket, then per check: token delta in seconds
#: of refill (negative refunds), 1 to release a slot else 0.
_SETTLE = (
    _PRELUDE
    + """
for i = 1, #KEYS / 2 do
  local d, rel = tonumber(ARGV[2 * i]), ARGV[2 * i + 1]
  if d ~= 0 then
    local st = redis.call('HMGET', KEYS[2 * i - 1], 'r', 't')
    local k = tonumber(st[2])
    if k ~= nil or d > 0 then
      local r = math.max(tonumber(st[1]) or now, now)
      keep(KEYS[2 * i - 1], r, math.max(math.max(k or now, now) + d, now))
    end
  end
  if rel == '1' then redis.call('ZREM', KEYS[2 * i], ARGV[1]) end
end
return 1
"""
)

_DIMENSIONS = ("", "requests", "tokens", "concurrent")


class RedisStore:
    """A :class:`~.ratelimit_store.RateLimitStore` on one Redis server.

    ``clock`` (monotonic seconds) times only the fail-fast backoff; bucket
    arithmetic uses Redis ``TIME``.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.1,
        key_prefix: str = "llmproxy:rl:",
        lease_s: float = 900.0,
        backoff_s: float = 0.5,
        max_connections: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A bounded pool: a slow Redis makes requests wait (within timeout_s)
        # for a connection instead of opening one per request.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._admit_script = self._redis.register_script(_ADMIT)
        self._settle_script = self._redis.register_script(_SETTLE)
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._lease_s = lease_s
        self._backoff_s = backoff_s
        self._clock = clock
        self._down_until = float("-inf")
        #: Settlements still running after their caller was cancelled.
        self._settling: set[asyncio.Task[None]] = set()

    def _keys(self, checks: Sequence[Check]) -> list[str]:
        keys: list[str] = []
        for c in checks:
            digest = hashlib.sha256(c.key.encode()).hexdigest()[:32]
            base = f"{self._prefix}{c.rule}:{digest}"
            keys.append(base)
            keys.append(base + ":c")
        return keys

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if self._clock() < self._down_until:
            msg = "redis failed recently; not retrying yet"
            raise StoreUnavailable(msg)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = self._clock() + self._backoff_s
            msg = f"redis: {type(exc).__name__}: {exc}"
            raise StoreUnavailable(msg) from exc

    async def admit(self, checks: Sequence[Check], cost: int, ticket_id: str) -> Decision:
        args: list[Any] = [cost, ticket_id, self._lease_s, BURST_S, EPS_S, CONCURRENCY_RETRY_S]
        for c in checks:
            args += [
                repr(interval(c.requests_per_minute)),
                repr(interval(c.tokens_per_minute)),
                c.max_concurrent,
            ]
        out = await self._run(self._admit_script, self._keys(checks), args)
        return Decision(
            int(out[0]) - 1, _DIMENSIONS[int(out[1])], float(out[2]), [float(x) for x in out[3:]]
        )

    async def settle(self, checks: Sequence[Check], delta_tokens: int, ticket_id: str) -> None:
        args: list[Any] = [ticket_id]
        for c in checks:
            args += [
                repr(delta_tokens * interval(c.tokens_per_minute)),
                1 if c.max_concurrent > 0 else 0,
            ]
        # Settlement usually runs in a request's ``finally``; a second
        # cancellation there must not leave the slot taken until its lease ends.
        task = asyncio.ensure_future(self._run(self._settle_script, self._keys(checks), args))
        self._settling.add(task)
        task.add_done_callback(self._settled)
        await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved; the awaiting caller (if any) handles it

    async def close(self) -> None:
        if self._settling:
            await asyncio.wait(self._settling, timeout=self._timeout_s * 2)
        await self._redis.aclose()
