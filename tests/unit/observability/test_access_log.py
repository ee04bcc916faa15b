from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from llmproxy.observability.access_log import (
    OUTCOMES,
    AccessEntry,
    AccessLog,
    AccessLogConfig,
)

FIELDS = {
    "time",
    "request_id",
    "method",
    "path",
    "route",
    "pool",
    "backend",
    "attempts",
    "status",
    "ttfb_ms",
    "duration_ms",
    "bytes_sent",
    "prompt_tokens",
    "completion_tokens",
    "client_ip",
    "api_key_name",
    "stream",
    "outcome",
    "error",
    "trace_id",
}
SECRET_KEY = "sk-live-0123456789abcdefSECRET"
PROMPT = "my bank password is hunter2, please summarise"
# 2024-05-01T12:00:00.123Z
T0 = 1714564800.123


def entry(**overrides: Any) -> AccessEntry:
    values: dict[str, Any] = {
        "time": T0,
        "request_id": "req-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "chat",
        "pool": "stable",
        "backend": "gpu-1",
        "attempts": 2,
        "status": 200,
        "ttfb_ms": 123.4567,
        "duration_ms": 4567.8912,
        "bytes_sent": 2048,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "client_ip": "192.0.2.7",
        "api_key_name": "team-a",
        "stream": True,
        "outcome": "ok",
        "error": None,
    }
    values.update(overrides)
    return AccessEntry(**values)


def entry_from_request(
    headers: Mapping[str, str], body: dict[str, Any], query: str, log: AccessLog
) -> AccessEntry:
    """What the request path does: the tenant's *name* and the path, never a
    header map; the prompt only when the log asks for it."""
    prompt = body["messages"][-1]["content"] if log.wants_prompt else None
    key_names = {SECRET_KEY: "team-a"}
    token = headers["Authorization"].removeprefix("Bearer ")
    return entry(
        path=f"/v1/chat/completions?{query}",  # a careless caller keeps the query
        api_key_name=key_names[token],
        prompt=prompt,
    )


class ListSink:
    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.chunks.append(text)

    def flush(self) -> None:
        self.flushes += 1

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in "".join(self.chunks).splitlines()]


class GatedSink(ListSink):
    """A sink stuck in ``write`` until the test opens the gate (a stalled disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write(self, text: str) -> None:
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        super().write(text)


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)


@pytest.fixture
def started() -> Iterator[Callable[..., tuple[AccessLog, ListSink]]]:
    logs: list[AccessLog] = []

    def make(sink: ListSink | None = None, **cfg: Any) -> tuple[AccessLog, ListSink]:
        sink = sink or ListSink()
        log = AccessLog(AccessLogConfig(**cfg), sink=sink)
        log.start()
        logs.append(log)
        return log, sink

    yield make
    for log in logs:
        log.stop()


# -- the line -------------------------------------------------------------------


def test_a_line_has_every_field_and_is_json(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    log, sink = started()
    assert log.record(entry())
    assert log.record(entry(request_id="req-2", stream=False, ttfb_ms=None, outcome="timeout"))
    log.stop()

    text = "".join(sink.chunks)
    assert text.endswith("\n")
    first, second = sink.lines()
    assert set(first) == FIELDS
    assert first == {
        "time": "2024-05-01T12:00:00.123Z",
        "request_id": "req-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "chat",
        "pool": "stable",
        "backend": "gpu-1",
        "attempts": 2,
        "status": 200,
        "ttfb_ms": 123.457,
        "duration_ms": 4567.891,
        "bytes_sent": 2048,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "client_ip": "192.0.2.7",
        "api_key_name": "team-a",
        "stream": True,
        "outcome": "ok",
        "error": None,
        "trace_id": None,
    }
    assert (second["request_id"], second["ttfb_ms"], second["stream"]) == ("req-2", None, False)
    assert second["outcome"] in OUTCOMES


#: Strings a line must escape the way json.dumps does.
AWKWARD = [
    "",
    'quote " and backslash \\',
    "tab\tnewline\ncarriage\rnul\x00bell\x07del\x7f",
    "naïve café ☕ 日本語 😀 \u2028\u2029",
    "lone surrogate \ud800 end",
    "</script><!-- &amp;",
    "x" * 3000,
]


def clock_text(epoch_s: float) -> str:
    """``2024-05-01T12:00:00.123Z``, as a line's ``time`` shows it."""
    second = int(epoch_s)
    millis = min(999, round((epoch_s - second) * 1_000_000) // 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))}.{millis:03d}Z"


def reference_line(log: AccessLog, e: AccessEntry, log_prompts: bool) -> str:
    """The line as json.dumps of a dict would give it (the earlier formatter)."""
    record: dict[str, Any] = {
        "time": clock_text(e.time),
        "request_id": e.request_id,
        "method": e.method,
        "path": e.path.partition("?")[0][:2048],
        "route": e.route,
        "pool": e.pool,
        "backend": e.backend,
        "attempts": e.attempts,
        "status": e.status,
        "ttfb_ms": None if e.ttfb_ms is None else round(e.ttfb_ms, 3),
        "duration_ms": round(e.duration_ms, 3),
        "bytes_sent": e.bytes_sent,
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "client_ip": e.client_ip,
        "api_key_name": e.api_key_name,
        "stream": e.stream,
        "outcome": e.outcome,
        "error": None if e.error is None else e.error[:500],
        "trace_id": e.trace_id,
    }
    if log_prompts and e.prompt is not None:
        record["prompt"] = e.prompt[:200]
    return json.dumps(record, separators=(",", ":"), default=str) + "\n"


@pytest.mark.parametrize("log_prompts", [False, True])
def test_a_line_is_what_json_dumps_gives(log_prompts: bool) -> None:
    rng = random.Random(11)
    log = AccessLog(AccessLogConfig(log_prompts=log_prompts))

    def text() -> str | None:
        return rng.choice([None, *AWKWARD])

    numbers: list[Any] = [None, 0, 1, -1, 2**70, 0.1, 1e-7, 1e22, 123.4567, float("nan"), True]
    for _ in range(2000):
        e = entry(
            time=T0 + rng.uniform(0, 5),
            request_id=rng.choice(AWKWARD),
            method=rng.choice(["GET", "POST", "DELETE"]),
            path=rng.choice(AWKWARD) + rng.choice(["", "?api_key=secret"]),
            route=text(),
            pool=text(),
            backend=text(),
            attempts=rng.choice([0, 1, 3]),
            status=rng.choice([200, 499, 503]),
            ttfb_ms=rng.choice(numbers),
            duration_ms=rng.choice([0.0, 1.23456, 4567.8912, float("inf"), 7]),
            bytes_sent=rng.choice([0, 2048, 2**40]),
            prompt_tokens=rng.choice(numbers),
            completion_tokens=rng.choice(numbers),
            client_ip=text(),
            api_key_name=text(),
            stream=rng.choice([True, False]),
            outcome=rng.choice(OUTCOMES),
            error=text(),
            prompt=text(),
            trace_id=rng.choice([None, "0af7651916cd43dd8448eb211c80319c"]),
        )
        assert log._format(e) == reference_line(log, e, log_prompts), e


def test_time_is_iso8601_utc_with_milliseconds(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    log, sink = started()
    log.record(entry(time=0.0))
    log.record(entry(time=T0 + 0.0009))  # truncated, not rounded up
    log.stop()
    times = [line["time"] for line in sink.lines()]
    assert times == ["1970-01-01T00:00:00.000Z", "2024-05-01T12:00:00.123Z"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t) for t in times)


def test_error_text_is_kept_short(started: Callable[..., tuple[AccessLog, ListSink]]) -> None:
    log, sink = started()
    log.record(entry(outcome="upstream_error", status=502, error="x" * 10_000))
    log.stop()
    (line,) = sink.lines()
    assert line["error"] == "x" * 500


# -- no secrets -------------------------------------------------------------------


def test_an_entry_cannot_hold_headers() -> None:
    """By construction: the record API takes an AccessEntry, whose fields are
    exactly these plain values (plus the opt-in prompt)."""
    names = {f.name for f in dataclasses.fields(AccessEntry)}
    assert names == FIELDS | {"prompt"}
    assert not any("header" in n or "auth" in n or n in {"key", "api_key", "token"} for n in names)


def test_no_key_authorization_query_or_prompt_in_the_log(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    log, sink = started()
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
    e = entry_from_request(headers, body, f"api_key={SECRET_KEY}", log)
    # Even a request path that supplies the prompt by mistake does not leak it.
    e.prompt = PROMPT
    log.record(e)
    log.stop()

    text = "".join(sink.chunks)
    for secret in (SECRET_KEY, "Bearer", "Authorization", PROMPT, "hunter2", "api_key="):
        assert secret not in text
    (line,) = sink.lines()
    assert "prompt" not in line
    assert line["path"] == "/v1/chat/completions"
    assert line["api_key_name"] == "team-a"


def test_prompt_only_when_asked_and_cut(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    log, sink = started(log_prompts=True, prompt_max_chars=10)
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    body = {"messages": [{"role": "user", "content": PROMPT}]}
    log.record(entry_from_request(headers, body, "", log))
    log.record(entry())  # no prompt supplied: the field stays absent
    log.stop()
    with_prompt, without = sink.lines()
    assert with_prompt["prompt"] == PROMPT[:10]
    assert "prompt" not in without
    assert SECRET_KEY not in "".join(sink.chunks)


# -- the writer thread --------------------------------------------------------------


def test_stop_flushes_what_was_recorded(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    # The writer would not wake on its own for a minute: stop() must flush.
    log, sink = started(flush_interval_s=60.0)
    for i in range(25):
        log.record(entry(request_id=f"r{i}"))
    log.stop()
    assert [line["request_id"] for line in sink.lines()] == [f"r{i}" for i in range(25)]
    assert (log.written, log.pending, log.dropped) == (25, 0, 0)
    assert sink.flushes >= 1


def test_the_writer_writes_without_stop(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    log, sink = started(flush_interval_s=0.01)
    log.record(entry())
    wait_for(lambda: log.written == 1)
    assert len(sink.lines()) == 1


def test_no_line_waits_for_a_later_one(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    """Stress: after a quiet spell the writer sleeps until an entry wakes it.
    However a burst falls against the writer's rounds, every line is written
    without a later record or stop() to push it out (a lost wake-up would
    leave the last line waiting). A tiny GIL switch interval makes the two
    threads interleave everywhere."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        log, sink = started(flush_interval_s=0)
        rng = random.Random(7)
        n = 0
        for _ in range(400):
            for _ in range(rng.choice((1, 2, 3, 5))):
                log.record(entry(request_id=f"r{n}"))
                n += 1
                # Catch the writer at a random point of its round.
                for _ in range(rng.randrange(3000)):
                    pass
            wait_for(lambda count=n: log.written == count)
    finally:
        sys.setswitchinterval(before)
    assert [line["request_id"] for line in sink.lines()] == [f"r{i}" for i in range(n)]
    assert log.pending == 0


def test_stop_is_idempotent_and_later_records_are_dropped(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    log, sink = started()
    log.record(entry())
    log.stop()
    log.stop()
    assert not log.record(entry())
    assert log.dropped == 1
    assert len(sink.lines()) == 1
    with pytest.raises(RuntimeError, match="stopped"):
        log.start()


def test_start_is_idempotent(started: Callable[..., tuple[AccessLog, ListSink]]) -> None:
    log, sink = started()
    log.start()
    log.record(entry())
    log.stop()
    assert len(sink.lines()) == 1
    assert [t.name for t in threading.enumerate()].count("llmproxy-access-log") == 0


def test_disabled_log_records_nothing_and_starts_no_thread() -> None:
    sink = ListSink()
    log = AccessLog(AccessLogConfig(enabled=False), sink=sink)
    log.start()
    assert not log.enabled
    assert not log.record(entry())
    log.stop()
    assert sink.chunks == []
    assert "llmproxy-access-log" not in [t.name for t in threading.enumerate()]


async def test_a_stalled_sink_never_blocks_the_loop_and_drops_are_counted() -> None:
    sink = GatedSink()
    log = AccessLog(AccessLogConfig(max_pending=50, flush_interval_s=0.01), sink=sink)
    log.start()
    try:
        assert log.record(entry(request_id="first"))
        # The writer took the first entry and is now stuck in write().
        await asyncio.to_thread(sink.entered.wait, 5)
        assert sink.entered.is_set()

        t0 = time.perf_counter()
        accepted = [log.record(entry(request_id=f"r{i}")) for i in range(55)]
        elapsed = time.perf_counter() - t0
        # The sink blocks for up to 30 s per write; had record() waited on it
        # even once, this would take that long. (A bound, not a benchmark.)
        assert elapsed < 1.0
        # "first" is still pending (being written): 49 more fit, 6 are dropped.
        assert accepted == [True] * 49 + [False] * 6
        assert log.dropped == 6
        assert log.pending == 50
    finally:
        sink.gate.set()
        await asyncio.to_thread(log.stop)
    ids = [line["request_id"] for line in sink.lines()]
    assert ids == ["first"] + [f"r{i}" for i in range(49)]
    assert log.written + log.dropped == 56


def test_a_failing_sink_is_counted_and_the_writer_lives_on(
    started: Callable[..., tuple[AccessLog, ListSink]],
) -> None:
    class Flaky(ListSink):
        fail = True

        def write(self, text: str) -> None:
            if self.fail:
                raise OSError("disk full")
            super().write(text)

    sink = Flaky()
    log, _ = started(sink, flush_interval_s=0.01)
    log.record(entry(request_id="lost"))
    wait_for(lambda: log.write_errors == 1)
    sink.fail = False
    log.record(entry(request_id="kept"))
    log.stop()
    assert [line["request_id"] for line in sink.lines()] == ["kept"]
    assert (log.written, log.write_errors, log.pending) == (1, 1, 0)


# -- real sinks -----------------------------------------------------------------------


def test_file_sink_appends_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"old":true}\n')
    log = AccessLog(AccessLogConfig(path=str(path), flush_interval_s=0.01))
    log.start()
    try:
        log.record(entry(request_id="before"))
        wait_for(lambda: log.written == 1)
        path.rename(tmp_path / "access.log.1")  # what logrotate does
        log.record(entry(request_id="after"))
        wait_for(lambda: log.written == 2)
    finally:
        log.stop()
    rotated = (tmp_path / "access.log.1").read_text().splitlines()
    assert [json.loads(x).get("request_id") for x in rotated] == [None, "before"]
    assert [json.loads(x)["request_id"] for x in path.read_text().splitlines()] == ["after"]


def test_unwritable_file_fails_at_start(tmp_path: Path) -> None:
    log = AccessLog(AccessLogConfig(path=str(tmp_path / "missing-dir" / "access.log")))
    with pytest.raises(FileNotFoundError):
        log.start()


def test_dash_means_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog(AccessLogConfig(path="-"))
    log.start()
    log.record(entry())
    log.stop()
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["request_id"] == "req-1"
