""" "Backend down" news shared between gateway instances over Redis pub/sub.

Optional and off by default. When a gateway instance sees a backend fail (its
breaker opens, outlier detection ejects it, active checks mark it unhealthy)
it publishes a :class:`BackendNews`; every other instance, on hearing it,
ejects that backend locally for a short hold (see :func:`apply_news`). Every
instance then stops sending to a dead replica within one message delay,
instead of each paying its own failed requests to find out.

What state is per instance, and why that is safe
------------------------------------------------
Everything that decides where a request goes stays per instance: health (each
instance runs its own active checks), breakers, outlier ejections, in-flight
counts, slow start. Each instance has its own view of the replicas, built
from its own traffic and probes; there is no shared or replicated "backend
state", so no consensus to get wrong and nothing to go stale when Redis does.

The news only ever makes an instance *more cautious*:

* "down" news ejects a backend locally for at most ``hold_s`` (e.g. the
  breaker's reset timeout). An instance never sends traffic to a backend it
  thinks is down because of news; at worst a wrong or spoofed "down" message
  keeps a healthy backend out of one instance's rotation for ``hold_s``, the
  same as a local ejection would, and panic routing still applies.
* "up" news is published for symmetry and observability but is NOT trusted:
  a backend comes back only when the instance's own checks and traffic show
  it is healthy (ejection expiry, half-open breaker probes, health checks).
  Trusting "up" would let one instance's luck send every instance's traffic
  to a replica that is still failing for them.
* Losing news (Redis down, a full queue, a message published while an
  instance was reconnecting: pub/sub does not replay) only falls back to the
  per-instance behaviour, which is correct on its own.

Transport
---------
One channel (``ClusterConfig.channel``), JSON messages (:meth:`BackendNews.to_json`).
Each instance stamps its messages with its ``instance`` id and ignores its
own. :meth:`ClusterNews.publish` never blocks or raises: it enqueues on a
bounded queue that a background task drains (overflow is dropped and
counted). A background listener subscribes, delivers news to ``on_news``, and
on any failure (Redis gone, or silent: a PING is sent after ``keepalive_s``
of silence and must be answered within ``timeout_s``) reconnects with jittered
exponential backoff, logging once per failure streak. Nothing here can crash
the gateway: Redis being unreachable at start, or at any time, only means no
news. The Redis URL may carry a password and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmproxy.config.schema import ClusterConfig as ClusterConfig  # noqa: PLC0414 - re-export

log = logging.getLogger(__name__)

NewsState = Literal["down", "up"]
STATES: tuple[NewsState, ...] = ("down", "up")
#: Message format version; messages of another version are ignored (safe:
#: ignoring news is always allowed), so a rolling upgrade can change it.
VERSION = 1
#: Longest pool, backend or instance name accepted in a message.
MAX_NAME_CHARS = 256
#: Reasons are cut to this length (they are for logs, not for decisions).
MAX_REASON_CHARS = 200
#: Larger messages are ignored unparsed.
MAX_MESSAGE_BYTES = 4096

#: ``(pool, backend, hold_s)``: keep the backend out locally for ``hold_s``
#: seconds from now; it must extend, never shorten, an ejection in place.
EjectCallback = Callable[[str, str, float], None]


def default_instance() -> str:
    """``hostname-pid``: unique per process, readable in logs (the pod name on Kubernetes)."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class BackendNews:
    """One instance's verdict on one backend.

    ``at`` is wall-clock time (epoch seconds, ``time.time()``), the only clock
    instances on different hosts share; ``reason`` is free text for logs.
    """

    pool: str
    backend: str
    state: NewsState
    reason: str
    instance: str
    at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": VERSION,
                "pool": self.pool,
                "backend": self.backend,
                "state": self.state,
                "reason": self.reason[:MAX_REASON_CHARS],
                "instance": self.instance,
                "at": self.at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> BackendNews:
        """Parse and check a message; ``ValueError`` if it is not valid news."""
        if len(data) > MAX_MESSAGE_BYTES:
            msg = f"message of {len(data)} bytes is too large"
            raise ValueError(msg)
        obj = json.loads(data)  # JSONDecodeError is a ValueError
        if not isinstance(obj, dict):
            msg = "message is not a JSON object"
            raise ValueError(msg)
        if obj.get("v") != VERSION:
            msg = f"unknown message version {obj.get('v')!r}"
            raise ValueError(msg)
        names = {k: obj.get(k) for k in ("pool", "backend", "instance")}
        for key, value in names.items():
            if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
                msg = f"{key}: expected a non-empty string of at most {MAX_NAME_CHARS} chars"
                raise ValueError(msg)
        state = obj.get("state")
        if state not in STATES:
            msg = f"state: expected one of {STATES}, got {state!r}"
            raise ValueError(msg)
        reason = obj.get("reason", "")
        if not isinstance(reason, str):
            msg = "reason: expected a string"
            raise ValueError(msg)
        at = obj.get("at")
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            msg = "at: expected a finite number (epoch seconds)"
            raise ValueError(msg)
        return cls(
            pool=cast(str, names["pool"]),
            backend=cast(str, names["backend"]),
            state=cast(NewsState, state),
            reason=reason[:MAX_REASON_CHARS],
            instance=cast(str, names["instance"]),
            at=float(at),
        )


def apply_news(news: BackendNews, now: float, eject: EjectCallback, hold_s: float) -> bool:
    """Turn news from another instance into local caution; True if it ejected.

    Only "down" is acted on ("up" is not trusted: see the module docstring).
    The hold counts from when the news was made, so late news holds for less
    and news older than ``hold_s`` is ignored. ``now`` is wall-clock time
    (``time.time()``), like ``news.at``; a sender whose clock runs ahead counts
    as fresh (age 0), one whose clock lags by more than ``hold_s`` is ignored
    -- clock skew can only make an instance ignore news, never hold longer.
    ``eject`` gets the remaining hold in seconds; the caller checks that it
    knows the pool and backend.
    """
    if news.state != "down":
        return False
    remaining = hold_s - max(0.0, now - news.at)
    if remaining <= 0:
        return False
    eject(news.pool, news.backend, remaining)
    return True


class _Streak:
    """Logs the first failure of a streak as a warning and its end as info."""

    __slots__ = ("_what", "failures")

    def __init__(self, what: str) -> None:
        self._what = what
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        detail = f"{type(exc).__name__}: {exc}"
        if self.failures == 1:
            log.warning("cluster news: %s failed (%s); retrying with backoff", self._what, detail)
        else:
            log.debug("cluster news: %s failed again (%s)", self._what, detail)

    def ok(self) -> None:
        if self.failures:
            log.info("cluster news: %s works again after %d failures", self._what, self.failures)
            self.failures = 0


class _Backoff:
    """Exponential backoff with jitter: in ``[d/2, d]``, d doubling up to ``max_s``."""

    __slots__ = ("_d", "_max", "_min", "_rng")

    def __init__(self, min_s: float, max_s: float, rng: random.Random) -> None:
        self._min, self._max, self._rng = min_s, max_s, rng
        self._d = min_s

    def next(self) -> float:
        d = self._d
        self._d = min(self._max, self._d * 2)
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self._d = self._min


class _Silent(Exception):
    """The subscription stopped answering PINGs (a hung Redis or a dead path)."""


#: What a Redis outage looks like from here.
_REDIS_ERRORS = (RedisError, OSError, TimeoutError, _Silent)


class ClusterNews:
    """The pub/sub transport: :meth:`start`, :meth:`publish`, :meth:`close`.

    ``on_news`` is called in the event loop, from the listener task, with news
    from *other* instances (both states; the caller filters, e.g. with
    :func:`apply_news`); an exception it raises is logged and the listener
    goes on. Times are seconds.
    """

    def __init__(
        self,
        cfg: ClusterConfig,
        on_news: Callable[[BackendNews], None],
        *,
        queue_size: int = 256,
        timeout_s: float = 1.0,
        keepalive_s: float = 5.0,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if cfg.enabled and not cfg.redis:
            msg = "cluster news is enabled but no redis URL is set"
            raise ValueError(msg)
        self.cfg = cfg
        self.instance = cfg.instance or default_instance()
        self._on_news = on_news
        self._timeout_s = timeout_s
        self._keepalive_s = keepalive_s
        self._rng = rng or random.Random()
        self._backoff_range = (backoff_min_s, backoff_max_s)
        self._wall_clock = wall_clock
        self._queue: asyncio.Queue[BackendNews] = asyncio.Queue(maxsize=queue_size)
        self._redis: Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = False
        self._listen_streak = _Streak("subscription")
        self._publish_streak = _Streak("publishing")
        #: Counters for tests, logs and metrics.
        self.sent = 0
        self.dropped = 0
        self.received = 0
        self.invalid = 0

    @property
    def subscribed(self) -> bool:
        """The listener holds a confirmed subscription (news published now reaches it)."""
        return self._subscribed

    @property
    def failures(self) -> int:
        """Failed subscription attempts in a row (0 once subscribed again)."""
        return self._listen_streak.failures

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def news(self, pool: str, backend: str, state: NewsState, reason: str) -> BackendNews:
        """News from this instance, dated now."""
        return BackendNews(pool, backend, state, reason, self.instance, self._wall_clock())

    async def start(self) -> None:
        """Start the listener and the publisher; returns at once, even with Redis down.

        Does nothing unless ``cfg.enabled``.
        """
        if not self.cfg.enabled or self._tasks:
            return
        assert self.cfg.redis is not None  # checked in __init__
        # No retries inside redis-py: the loops below own reconnection and
        # backoff, and every call is bounded by timeout_s.
        self._redis = Redis.from_url(
            self.cfg.redis,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._tasks = [
            asyncio.create_task(self._listen(), name="cluster-news:listen"),
            asyncio.create_task(self._publish(), name="cluster-news:publish"),
        ]

    async def publish(self, news: BackendNews) -> None:
        """Queue ``news`` (stamped with this instance's id) for sending; never
        blocks or raises. Dropped when not running or when the queue is full."""
        self.publish_nowait(news)

    def publish_nowait(self, news: BackendNews) -> None:
        """:meth:`publish` for synchronous callers (state-change callbacks)."""
        if not self._tasks:
            return
        try:
            self._queue.put_nowait(replace(news, instance=self.instance))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("cluster news: queue full, %d messages dropped so far", self.dropped)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscribed = False
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.aclose()
            self._redis = None

    # -- background tasks -----------------------------------------------------

    async def _publish(self) -> None:
        assert self._redis is not None
        backoff = _Backoff(*self._backoff_range, self._rng)
        while True:
            news = await self._queue.get()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._redis.publish(self.cfg.channel, news.to_json())
            except Exception as exc:  # Redis errors, or a bug: the publisher lives on
                # Dropped, not retried: news is only worth something fresh, and
                # losing it falls back to each instance's own view.
                if not isinstance(exc, _REDIS_ERRORS):
                    log.exception("cluster news: unexpected error while publishing")
                self.dropped += 1
                self._publish_streak.failed(exc)
                await asyncio.sleep(backoff.next())
            else:
                self.sent += 1
                self._publish_streak.ok()
                backoff.reset()

    async def _listen(self) -> None:
        backoff = _Backoff(*self._backoff_range, self._rng)
        while True:
            try:
                await self._subscription(backoff)
            except _REDIS_ERRORS as exc:
                self._listen_streak.failed(exc)
            except Exception as exc:  # isolation boundary: the listener must live on
                log.exception("cluster news: unexpected error in the listener")
                self._listen_streak.failed(exc)
            finally:
                self._subscribed = False
            await asyncio.sleep(backoff.next())

    async def _subscription(self, backoff: _Backoff) -> None:
        """Subscribe and deliver until the connection fails (raises) or is cancelled."""
        assert self._redis is not None
        loop = asyncio.get_running_loop()
        pubsub: PubSub = self._redis.pubsub()
        try:
            async with asyncio.timeout(self._timeout_s):
                await pubsub.subscribe(self.cfg.channel)
                while True:  # the confirmation: from now on, nothing is missed
                    msg = await pubsub.get_message(timeout=self._timeout_s)
                    if msg is not None and msg["type"] == "subscribe":
                        break
            self._subscribed = True
            self._listen_streak.ok()
            backoff.reset()
            heard = loop.time()
            ping_deadline: float | None = None  # set while a PING awaits its answer
            while True:
                wake = ping_deadline if ping_deadline is not None else heard + self._keepalive_s
                msg = await pubsub.get_message(timeout=max(0.0, wake - loop.time()))
                now = loop.time()
                if msg is not None:
                    heard, ping_deadline = now, None
                    if msg["type"] == "message":
                        self._deliver(msg["data"])
                elif ping_deadline is not None and now >= ping_deadline:
                    msg_ = f"no answer to PING within {self._timeout_s}s"
                    raise _Silent(msg_)
                elif ping_deadline is None and now >= heard + self._keepalive_s:
                    async with asyncio.timeout(self._timeout_s):
                        await pubsub.ping()
                    ping_deadline = now + self._timeout_s
        finally:
            with contextlib.suppress(*_REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]

    def _deliver(self, data: Any) -> None:
        try:
            news = BackendNews.from_json(data)
        except ValueError as exc:
            self.invalid += 1
            log.debug("cluster news: ignored an invalid message: %s", exc)
            return
        if news.instance == self.instance:
            return
        self.received += 1
        try:
            self._on_news(news)
        except Exception:  # isolation boundary: a bad handler must not stop the news
            log.exception(
                "cluster news: handler failed on %s %s/%s", news.state, news.pool, news.backend
            )
