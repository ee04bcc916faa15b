"""DNS discovery: joins, drains, failures and empty answers, driven one lookup
at a time through an injected resolver (no real DNS, no sleeping)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from llmproxy.config.schema import BackendConfig, DiscoveryConfig
from llmproxy.discovery.dns import DEFAULT_JITTER, DnsDiscovery, Resolver, SystemResolver

NAME = "vllm-headless.llm.svc.cluster.local"
CFG = DiscoveryConfig(dns=NAME, port=8000)
A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"


#: A scripted answer that never comes.
HANG = "hang"
Answer = list[str] | Exception | str


class ScriptedResolver:
    """Answers from a script: a list of addresses, an exception to raise, or
    :data:`HANG`. The last entry repeats, so a test only scripts what changes."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.names: list[str] = []
        self.hanging = asyncio.Event()

    def then(self, *answers: Answer) -> None:
        self.answers = list(answers)

    async def resolve(self, name: str) -> list[str]:
        self.names.append(name)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if answer == HANG:
            self.hanging.set()
            await asyncio.Event().wait()
        assert isinstance(answer, list)
        return list(answer)


class Changes:
    """The on_change callback: records every list it receives."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[list[BackendConfig]] = []
        self.fail = fail

    def __call__(self, backends: list[BackendConfig]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("pool rebuild failed")
        self.calls.append(backends)

    @property
    def last_names(self) -> list[str]:
        return [b.name for b in self.calls[-1]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def no_wait(_: float) -> None:
    return None


def make(
    resolver: Resolver,
    cfg: DiscoveryConfig = CFG,
    changes: Changes | None = None,
    *,
    clock: Callable[[], float] | None = None,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = no_wait,
    jitter: float = DEFAULT_JITTER,
    ip_family: str = "any",
) -> tuple[DnsDiscovery, Changes]:
    changes = changes or Changes()
    discovery = DnsDiscovery(
        cfg,
        resolver,
        changes,
        clock=clock or FakeClock(),
        rng=rng or random.Random(1),
        sleep=sleep,
        jitter=jitter,
        ip_family=ip_family,
        pool="llama",
    )
    return discovery, changes


def names(backends: list[BackendConfig]) -> list[str]:
    return [b.name for b in backends]


# -- start-up and the backends produced ----------------------------------------


async def test_resolve_once_gives_the_start_up_set_without_calling_on_change() -> None:
    resolver = ScriptedResolver([B, A, B])
    discovery, changes = make(resolver)
    backends = await discovery.resolve_once()
    assert backends == [
        BackendConfig(url="http://10.0.0.1:8000", weight=1.0, name="10.0.0.1:8000"),
        BackendConfig(url="http://10.0.0.2:8000", weight=1.0, name="10.0.0.2:8000"),
    ]
    assert discovery.backends == backends
    assert changes.calls == []
    assert resolver.names == [NAME]


async def test_ipv6_addresses_are_bracketed_and_sorted_after_ipv4() -> None:
    cfg = replace(CFG, scheme="https", port=8443)
    discovery, _ = make(ScriptedResolver(["fd00::2", "10.0.0.9", "fd00:0::1"]), cfg)
    backends = await discovery.resolve_once()
    assert [(b.url, b.name) for b in backends] == [
        ("https://10.0.0.9:8443", "10.0.0.9:8443"),
        ("https://[fd00::1]:8443", "[fd00::1]:8443"),
        ("https://[fd00::2]:8443", "[fd00::2]:8443"),
    ]


async def test_junk_and_zoned_link_local_addresses_are_ignored() -> None:
    discovery, _ = make(ScriptedResolver(["not-an-ip", "fe80::1%eth0", A]))
    assert names(await discovery.resolve_once()) == ["10.0.0.1:8000"]


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("any", ["10.0.0.1:8000", "[fd00::1]:8000"]),
        ("ipv4", ["10.0.0.1:8000"]),
        ("ipv6", ["[fd00::1]:8000"]),
    ],
)
async def test_ip_family_keeps_one_address_per_dual_stack_pod(
    family: str, expected: list[str]
) -> None:
    discovery, _ = make(ScriptedResolver([A, "fd00::1"]), ip_family=family)
    assert names(await discovery.resolve_once()) == expected


async def test_resolve_once_failure_starts_empty_instead_of_raising() -> None:
    discovery, changes = make(ScriptedResolver(OSError("resolver unreachable"), [A]))
    assert await discovery.resolve_once() == []
    assert discovery.last_error == "OSError: resolver unreachable"
    assert await discovery.refresh()
    assert changes.last_names == ["10.0.0.1:8000"]


# -- joins, drains, no change -----------------------------------------------------


async def test_a_new_address_joins() -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver)
    await discovery.resolve_once()
    resolver.then([A, B])
    assert await discovery.refresh()
    assert changes.last_names == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert names(discovery.backends) == changes.last_names


async def test_a_vanished_address_is_dropped_from_the_list() -> None:
    resolver = ScriptedResolver([A, B, C])
    discovery, changes = make(resolver)
    await discovery.resolve_once()
    resolver.then([A, C])
    assert await discovery.refresh()
    assert changes.last_names == ["10.0.0.1:8000", "10.0.0.3:8000"]


async def test_a_rolling_update_replaces_addresses_in_one_change() -> None:
    resolver = ScriptedResolver([A, B])
    discovery, changes = make(resolver)
    await discovery.resolve_once()
    resolver.then([B, C])
    await discovery.refresh()
    assert len(changes.calls) == 1
    assert changes.last_names == ["10.0.0.2:8000", "10.0.0.3:8000"]


async def test_no_call_when_the_set_is_unchanged_whatever_the_order() -> None:
    resolver = ScriptedResolver([A, B], [B, A], [A, B, A], [B, A])
    discovery, changes = make(resolver)
    await discovery.resolve_once()
    for _ in range(3):
        assert not await discovery.refresh()
    assert changes.calls == []


async def test_a_failed_on_change_is_offered_again_at_the_next_refresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver, changes=Changes(fail=1))
    await discovery.resolve_once()
    resolver.then([A, B])
    with caplog.at_level(logging.ERROR, logger="llmproxy.discovery.dns"):
        assert not await discovery.refresh()
    assert "applying the new backend list failed" in caplog.text
    assert names(discovery.backends) == ["10.0.0.1:8000"]
    assert await discovery.refresh()
    assert changes.last_names == ["10.0.0.1:8000", "10.0.0.2:8000"]


# -- failures keep the last good set ----------------------------------------------


async def test_a_failing_resolver_keeps_the_last_good_set_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    resolver = ScriptedResolver([A, B])
    discovery, changes = make(resolver, clock=clock)
    await discovery.resolve_once()
    resolver.then(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    with caplog.at_level(logging.INFO, logger="llmproxy.discovery.dns"):
        for _ in range(4):
            clock.now += 10
            assert not await discovery.refresh()
    assert changes.calls == []
    assert names(discovery.backends) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert discovery.last_error is not None
    assert "Temporary failure in name resolution" in discovery.last_error
    assert discovery.consecutive_failures == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per failure streak"
    assert "keeping the last good set of 2 backend(s)" in warnings[0].getMessage()
    assert "pool 'llama'" in warnings[0].getMessage()
    snap = discovery.snapshot()
    assert snap["addresses"] == [A, B]
    assert (snap["consecutive_failures"], snap["failures_total"]) == (4, 4)
    assert snap["last_error_at"] == 1040.0
    assert snap["last_success_at"] == 1000.0

    caplog.clear()
    resolver.then([A, B, C])
    with caplog.at_level(logging.INFO, logger="llmproxy.discovery.dns"):
        assert await discovery.refresh()
    assert "lookups work again after 4 failure(s)" in caplog.text
    assert discovery.snapshot()["last_error"] is None
    assert discovery.consecutive_failures == 0
    assert changes.last_names == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


async def test_a_new_failure_streak_warns_again(caplog: pytest.LogCaptureFixture) -> None:
    resolver = ScriptedResolver([A])
    discovery, _ = make(resolver)
    await discovery.resolve_once()
    resolver.then(OSError("down"), [A], OSError("down again"))
    with caplog.at_level(logging.WARNING, logger="llmproxy.discovery.dns"):
        for _ in range(4):
            await discovery.refresh()
    assert [r.getMessage().count("lookup failed") for r in caplog.records] == [1, 1]


async def test_a_hanging_lookup_times_out_and_keeps_the_set() -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver, replace(CFG, timeout_s=0.01))
    await discovery.resolve_once()
    resolver.then(HANG)
    assert not await discovery.refresh()
    assert discovery.last_error == "lookup timed out after 0.01s"
    assert names(discovery.backends) == ["10.0.0.1:8000"]
    assert changes.calls == []


# -- empty answers ------------------------------------------------------------------


async def test_an_empty_answer_counts_only_after_empty_after_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = ScriptedResolver([A, B])
    discovery, changes = make(resolver)  # empty_after=3
    await discovery.resolve_once()
    resolver.then([])
    with caplog.at_level(logging.WARNING, logger="llmproxy.discovery.dns"):
        assert not await discovery.refresh()
        assert not await discovery.refresh()
        assert changes.calls == []
        assert names(discovery.backends) == ["10.0.0.1:8000", "10.0.0.2:8000"]
        assert await discovery.refresh()
    assert changes.calls == [[]]
    assert discovery.backends == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "no address in the answer" in messages[0]
    assert "0 backend(s)" in messages[1]
    assert discovery.last_error is None, "an empty answer is an answer, not an error"
    # Scaled to zero: further empty answers change nothing.
    assert not await discovery.refresh()
    assert changes.calls == [[]]


async def test_an_address_in_between_restarts_the_empty_streak() -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver)
    await discovery.resolve_once()
    resolver.then([], [], [A], [], [], [A])
    for _ in range(6):
        await discovery.refresh()
    assert changes.calls == []


async def test_failures_neither_count_towards_nor_reset_the_empty_streak() -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver)
    await discovery.resolve_once()
    resolver.then([], OSError("blip"), [], OSError("blip"), [])
    for _ in range(4):
        await discovery.refresh()
    assert changes.calls == []
    await discovery.refresh()
    assert changes.calls == [[]]


async def test_empty_after_one_applies_an_empty_answer_at_once() -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver, replace(CFG, empty_after=1))
    await discovery.resolve_once()
    resolver.then([])
    assert await discovery.refresh()
    assert changes.calls == [[]]


async def test_an_empty_answer_with_nothing_to_drop_calls_nothing() -> None:
    discovery, changes = make(ScriptedResolver([]))
    assert await discovery.resolve_once() == []
    for _ in range(5):
        assert not await discovery.refresh()
    assert changes.calls == []


async def test_addresses_only_of_the_unwanted_family_count_as_empty() -> None:
    resolver = ScriptedResolver([A])
    discovery, changes = make(resolver, replace(CFG, empty_after=2), ip_family="ipv4")
    await discovery.resolve_once()
    resolver.then(["fd00::1"])
    assert not await discovery.refresh()
    assert await discovery.refresh()
    assert changes.calls == [[]]


# -- the loop --------------------------------------------------------------------


class Stop(Exception):
    """Raised by the fake sleep to end run() after a set number of waits."""


def counted_sleep(delays: list[float], waits: int) -> Callable[[float], Awaitable[None]]:
    async def sleep(delay: float) -> None:
        if len(delays) == waits:
            raise Stop
        delays.append(delay)

    return sleep


async def test_run_waits_then_refreshes_each_interval_with_jitter() -> None:
    resolver = ScriptedResolver([A], [A, B], [A, B], [B])
    delays: list[float] = []
    discovery, changes = make(
        resolver,
        replace(CFG, refresh_s=10.0),
        jitter=0.2,
        rng=random.Random(7),
        sleep=counted_sleep(delays, 3),
    )
    await discovery.resolve_once()
    with pytest.raises(Stop):
        await discovery.run()
    assert len(delays) == 3
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(set(delays)) == 3, "jittered, not in step"
    assert len(resolver.names) == 4
    assert [names(c) for c in changes.calls] == [
        ["10.0.0.1:8000", "10.0.0.2:8000"],
        ["10.0.0.2:8000"],
    ]


def test_next_delay_without_jitter_is_refresh_s() -> None:
    discovery, _ = make(ScriptedResolver([A]), replace(CFG, refresh_s=7.5), jitter=0.0)
    assert {discovery.next_delay() for _ in range(5)} == {7.5}


async def test_run_cancels_cleanly_while_waiting() -> None:
    waiting = asyncio.Event()

    async def sleep(_: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    discovery, changes = make(ScriptedResolver([A]), sleep=sleep)
    task = asyncio.create_task(discovery.run())
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert changes.calls == []


async def test_run_cancels_cleanly_during_a_lookup() -> None:
    resolver = ScriptedResolver(HANG)
    discovery, changes = make(resolver)
    task = asyncio.create_task(discovery.run())
    await resolver.hanging.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert discovery.last_error is None, "a cancellation is not a lookup failure"
    assert discovery.consecutive_failures == 0
    assert changes.calls == []


# -- the system resolver -----------------------------------------------------------


async def test_system_resolver_resolves_localhost_from_etc_hosts() -> None:
    addresses = await SystemResolver().resolve("localhost")
    assert addresses
    assert set(addresses) <= {"127.0.0.1", "::1"}
    assert addresses == sorted(set(addresses), key=lambda ip: ":" in ip)


def test_system_resolver_works_on_uvloop_too() -> None:
    """The gateway runs on uvloop, whose getaddrinfo is libuv's."""
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        addresses = loop.run_until_complete(SystemResolver().resolve("localhost"))
    finally:
        loop.close()
    assert addresses
    assert set(addresses) <= {"127.0.0.1", "::1"}


async def test_system_resolver_drives_a_discovery_end_to_end() -> None:
    discovery, _ = make(SystemResolver(), replace(CFG, dns="localhost"), ip_family="ipv4")
    assert names(await discovery.resolve_once()) == ["127.0.0.1:8000"]


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (socket.EAI_NONAME, "empty"),  # NXDOMAIN: the name has no address
        (socket.EAI_AGAIN, "raises"),  # SERVFAIL / timeout: the answer is unknown
        (socket.EAI_FAIL, "raises"),
    ],
)
async def test_system_resolver_tells_no_address_from_unknown(
    monkeypatch: pytest.MonkeyPatch, code: int, outcome: str
) -> None:
    async def getaddrinfo(*_: object, **__: object) -> list[object]:
        raise socket.gaierror(code, "simulated")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    if outcome == "empty":
        assert await SystemResolver().resolve(NAME) == []
    else:
        with pytest.raises(socket.gaierror):
            await SystemResolver().resolve(NAME)


async def test_system_resolver_deduplicates_getaddrinfo_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[object, ...]] = []

    async def getaddrinfo(host: str, port: object, **kwargs: object) -> list[object]:
        seen.append((host, port, kwargs["family"], kwargs["type"]))
        stream = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
        stream6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "")
        return [
            (*stream, (B, 0)),
            (*stream6, ("fd00::1", 0, 0, 0)),
            (*stream, (A, 0)),
            (*stream, (B, 0)),
        ]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    assert await SystemResolver().resolve(NAME) == [A, B, "fd00::1"]
    assert seen == [(NAME, None, socket.AF_UNSPEC, socket.SOCK_STREAM)]


# -- construction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"ip_family": "inet"}, {"jitter": -0.1}, {"jitter": 1.0}], ids=str
)
def test_bad_runner_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DnsDiscovery(CFG, ScriptedResolver([A]), Changes(), **kwargs)
