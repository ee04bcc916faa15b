"""Cluster news over a real redis-server: two instances hear each other, never
themselves, and ride out Redis being killed or hung.

The message codec and :func:`apply_news` are pure and tested first, here,
next to the transport they belong to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llmproxy.cluster.news import (
    BackendNews,
    ClusterConfig,
    ClusterNews,
    apply_news,
    default_instance,
)
from tests.redis_support import RedisServer, redis_server

NEWS = BackendNews("main", "10.0.0.7:8000", "down", "breaker opened", "gw-a", 1000.0)


async def eventually(
    check: Callable[[], Any], within_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds; fail after ``within_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- the message and its use (pure) --------------------------------------------------


def test_news_round_trips_through_json() -> None:
    assert BackendNews.from_json(NEWS.to_json()) == NEWS
    assert BackendNews.from_json(NEWS.to_json().encode()) == NEWS


def test_long_reasons_are_cut() -> None:
    news = BackendNews("p", "b", "down", "x" * 1000, "i", 1.0)
    assert len(BackendNews.from_json(news.to_json()).reason) == 200


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '{"v": 2, "pool": "p", "backend": "b", "state": "down", "instance": "i", "at": 1}',
        '{"v": 1, "pool": "", "backend": "b", "state": "down", "instance": "i", "at": 1}',
        '{"v": 1, "pool": "p", "backend": 7, "state": "down", "instance": "i", "at": 1}',
        '{"v": 1, "pool": "p", "backend": "b", "state": "sideways", "instance": "i", "at": 1}',
        '{"v": 1, "pool": "p", "backend": "b", "state": "down", "at": 1}',
        '{"v": 1, "pool": "p", "backend": "b", "state": "down", "instance": "i", "at": true}',
        '{"v": 1, "pool": "p", "backend": "b", "state": "down", "instance": "i", "at": NaN}',
        '{"v": 1, "pool": "p", "backend": "b", "state": "down", "instance": "i", "at": 1,'
        ' "reason": 5}',
        '{"v": 1, "pool": "' + "p" * 5000 + '"}',
    ],
)
def test_invalid_messages_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the whole contract is "ValueError"
        BackendNews.from_json(raw)


class Ejections:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, pool: str, backend: str, hold_s: float) -> None:
        self.calls.append((pool, backend, hold_s))


def test_down_news_ejects_for_the_rest_of_the_hold() -> None:
    eject = Ejections()
    assert apply_news(NEWS, now=1002.5, eject=eject, hold_s=10.0)
    assert eject.calls == [("main", "10.0.0.7:8000", 7.5)]


def test_up_news_is_not_trusted() -> None:
    eject = Ejections()
    up = BackendNews("main", "b", "up", "breaker closed", "gw-a", 1000.0)
    assert not apply_news(up, now=1000.0, eject=eject, hold_s=10.0)
    assert eject.calls == []


def test_news_older_than_the_hold_is_ignored() -> None:
    eject = Ejections()
    assert not apply_news(NEWS, now=1010.0, eject=eject, hold_s=10.0)
    assert eject.calls == []


def test_a_sender_clock_ahead_never_lengthens_the_hold() -> None:
    eject = Ejections()
    assert apply_news(NEWS, now=990.0, eject=eject, hold_s=10.0)
    assert eject.calls == [("main", "10.0.0.7:8000", 10.0)]


# -- the transport --------------------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.news: list[BackendNews] = []

    def __call__(self, news: BackendNews) -> None:
        self.news.append(news)

    def reasons(self) -> list[str]:
        return [n.reason for n in self.news]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


MakeNews = Callable[..., ClusterNews]


@pytest.fixture
async def make_news(redis: RedisServer) -> AsyncIterator[MakeNews]:
    """Instances with fast timeouts and backoff, closed at the end of the test."""
    made: list[ClusterNews] = []

    def make(instance: str, on_news: Callable[[BackendNews], None], **kw: Any) -> ClusterNews:
        cfg = ClusterConfig(redis=redis.url, instance=instance, enabled=True)
        opts: dict[str, Any] = {"timeout_s": 0.5, "backoff_min_s": 0.02, "backoff_max_s": 0.2}
        made.append(ClusterNews(cfg, on_news, **(opts | kw)))
        return made[-1]

    yield make
    for news in made:
        await news.close()


async def started(*instances: ClusterNews) -> None:
    for n in instances:
        await n.start()
    await eventually(lambda: all(n.subscribed for n in instances), what="subscriptions")


async def test_down_news_reaches_the_other_instance(make_news: MakeNews) -> None:
    inbox_a, inbox_b = Inbox(), Inbox()
    a, b = make_news("gw-a", inbox_a), make_news("gw-b", inbox_b)
    await started(a, b)

    await a.publish(a.news("main", "10.0.0.7:8000", "down", "breaker opened"))
    await eventually(lambda: inbox_b.news, what="b to hear a's news")
    [got] = inbox_b.news
    assert (got.pool, got.backend, got.state, got.reason, got.instance) == (
        "main",
        "10.0.0.7:8000",
        "down",
        "breaker opened",
        "gw-a",
    )

    # Redis delivers in publish order: once a hears b's later message, it has
    # already seen (and must have ignored) its own.
    await b.publish(b.news("main", "10.0.0.8:8000", "down", "ejected"))
    await eventually(lambda: inbox_a.news, what="a to hear b's news")
    assert inbox_a.reasons() == ["ejected"]
    assert inbox_b.reasons() == ["breaker opened"]
    assert (a.sent, b.sent, a.received, b.received) == (1, 1, 1, 1)


async def test_publish_stamps_the_instance_id(make_news: MakeNews) -> None:
    inbox_b = Inbox()
    a, b = make_news("gw-a", Inbox()), make_news("gw-b", inbox_b)
    await started(a, b)
    await a.publish(NEWS)  # made elsewhere, with another instance's id
    await eventually(lambda: inbox_b.news, what="b to hear a's news")
    assert inbox_b.news[0].instance == "gw-a"


async def test_invalid_messages_and_a_failing_handler_do_not_stop_the_listener(
    make_news: MakeNews, redis: RedisServer
) -> None:
    seen: list[BackendNews] = []

    def handler(news: BackendNews) -> None:
        seen.append(news)
        if len(seen) == 1:
            raise RuntimeError("handler bug")

    b = make_news("gw-b", handler)
    await started(b)
    raw = Redis.from_url(redis.url)
    try:
        await raw.publish("llmproxy:news", b"\xff not json")
        await raw.publish("llmproxy:news", NEWS.to_json())
        await raw.publish("llmproxy:news", NEWS.to_json())
    finally:
        await raw.aclose()
    await eventually(lambda: len(seen) == 2, what="both valid messages")
    assert b.invalid == 1
    assert b.subscribed


async def test_redis_killed_then_restarted(make_news: MakeNews, redis: RedisServer) -> None:
    inbox_b = Inbox()
    a = make_news("gw-a", Inbox(), queue_size=8)
    b = make_news("gw-b", inbox_b)
    await started(a, b)

    redis.kill()
    await eventually(lambda: not (a.subscribed or b.subscribed), what="both to notice")
    # Publishing neither raises nor blocks: far more than the queue holds.
    async with asyncio.timeout(1.0):
        for i in range(100):
            await a.publish(a.news("main", f"b{i}", "down", "while redis is dead"))
    assert a.dropped == 92  # at once: the queue holds 8
    await eventually(lambda: a.dropped == 100, what="the queued 8 to fail and be dropped")
    assert a.sent == 0

    redis.restart()
    await started(a, b)  # the listeners resubscribe on their own
    # Sends may still fail once on a dead pooled connection: news is
    # best-effort, so keep publishing until one arrives.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while "after restart" not in inbox_b.reasons():
        assert loop.time() < deadline, "no news arrived after redis restarted"
        await a.publish(a.news("main", "b1", "down", "after restart"))
        await asyncio.sleep(0.05)


async def test_hung_redis_is_detected_and_survived(
    make_news: MakeNews, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    inbox_b = Inbox()
    a = make_news("gw-a", Inbox(), keepalive_s=60.0)
    b = make_news("gw-b", inbox_b, keepalive_s=0.1, timeout_s=0.2)
    await started(a, b)
    caplog.set_level(logging.DEBUG, logger="llmproxy.cluster.news")

    redis.pause()  # keeps its socket, answers nothing: only the PING notices
    try:
        await eventually(lambda: not b.subscribed, what="the silent subscription to be dropped")
        async with asyncio.timeout(1.0):
            await a.publish(a.news("main", "b1", "down", "while redis hangs"))
        # Let it fail a few reconnections in a row: still one warning.
        await eventually(lambda: b.failures >= 3, what="failed reconnections")
    finally:
        redis.resume()
    await started(b)

    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "subscription" in r.message
    ]
    assert len(warnings) == 1, [r.message for r in warnings]
    assert any("subscription works again" in r.message for r in caplog.records)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while "after resume" not in inbox_b.reasons():
        assert loop.time() < deadline, "no news arrived after redis resumed"
        await a.publish(a.news("main", "b1", "down", "after resume"))
        await asyncio.sleep(0.05)


async def test_unreachable_redis_at_start_is_not_an_error() -> None:
    # Port 1 on loopback: nothing listens there.
    cfg = ClusterConfig(redis="redis://127.0.0.1:1/0", instance="gw-a", enabled=True)
    news = ClusterNews(cfg, Inbox(), timeout_s=0.2, backoff_min_s=0.02, backoff_max_s=0.1)
    try:
        async with asyncio.timeout(1.0):
            await news.start()
            await news.publish(NEWS)
        await eventually(lambda: news.failures >= 2, what="retries")
        assert news.running
        assert not news.subscribed
    finally:
        await news.close()
    assert not news.running


async def test_disabled_news_does_nothing() -> None:
    news = ClusterNews(ClusterConfig(), Inbox())
    await news.start()
    await news.publish(NEWS)
    assert not news.running
    assert news.instance == default_instance()
    await news.close()


def test_enabled_without_redis_is_refused() -> None:
    with pytest.raises(ValueError, match="redis"):
        ClusterNews(ClusterConfig(enabled=True), Inbox())
