"""Many concurrent SSE streams; counts events and samples CPU over a window.

``python -m bench_lib.sse_load --port P --streams 1000 --window-s 10 --pids 123``

Opens ``--streams`` streaming chat completions in batches, each batch only
once the previous one has its response headers (so no listen backlog
overflows, however slow the upstream is to accept), waits until every stream
is streaming,
lets them run ``--warmup-s``, then measures for ``--window-s``: events
received, and the CPU time (``/proc/PID/stat``) of the processes given with
``--pids`` (the proxy under test) and ``--upstream-pids`` (to show whether the
upstream kept up). Then it closes every connection, which the proxy must turn
into cancelled upstream requests.

A bare ``asyncio.Protocol`` on uvloop counts ``data:`` occurrences in the raw
bytes (the SSE framing the simulated replica sends; chunked transfer-encoding
framing never contains it), so the load generator stays cheap next to the
proxy. Standard library + uvloop. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from bench_lib.loop import run
from bench_lib.procs import cpu_seconds, rss_bytes
from bench_lib.report import percentile

_MARK = b"data:"
_KEEP = len(_MARK) - 1


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Shared:
    events: int = 0
    #: Streams whose response head arrived (any status) or that closed before it.
    responded: int = 0
    streaming: int = 0
    failed: int = 0
    closed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    all_streaming: asyncio.Event = field(default_factory=asyncio.Event)
    target: int = 0
    #: Set once ``responded`` reaches ``batch_end``.
    batch_answered: asyncio.Event = field(default_factory=asyncio.Event)
    batch_end: int = 0
    #: Streams that received at least one event.
    first_events: int = 0
    #: Set once ``first_events`` reaches ``target``.
    all_first: asyncio.Event = field(default_factory=asyncio.Event)
    #: Inter-event gaps (s) are recorded while this is true.
    recording: bool = False
    gaps: array[float] = field(default_factory=lambda: array("d"))

    def note_response(self) -> None:
        self.responded += 1
        if self.responded >= self.batch_end:
            self.batch_answered.set()


class Stream(asyncio.Protocol):
    __slots__ = (
        "_head",
        "_last",
        "_request",
        "_shared",
        "_streaming",
        "_tail",
        "closed",
        "events",
        "transport",
    )

    def __init__(self, shared: Shared, request: bytes) -> None:
        self._shared = shared
        self._request = request
        self._head: bytes | None = b""
        self._tail = b""
        self._streaming = False
        #: When the last event arrived (monotonic s), 0 before the first.
        self._last = 0.0
        self.events = 0
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        sh = self._shared
        if not self._streaming:
            if self._head is None:
                return
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self._head[9:12].decode(errors="replace")
            sh.statuses[status] = sh.statuses.get(status, 0) + 1
            sh.note_response()
            if status != "200":
                sh.failed += 1
                self._head = None
                assert self.transport is not None
                self.transport.close()
                return
            data = self._head[end + 4 :]
            self._head = None
            self._streaming = True
            sh.streaming += 1
            if sh.streaming == sh.target:
                sh.all_streaming.set()
        buf = self._tail + data
        n = buf.count(_MARK)
        self._tail = buf[-_KEEP:]
        if not n:
            return
        sh.events += n
        now = time.monotonic()
        if not self.events:
            sh.first_events += 1
            if sh.first_events == sh.target:
                sh.all_first.set()
        elif sh.recording:
            sh.gaps.append(now - self._last)
            for _ in range(n - 1):
                sh.gaps.append(0.0)
        self.events += n
        self._last = now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._shared.closed += 1
        if not self._streaming and self._head is not None:
            self._head = None  # closed before a response head: counts as failed
            self._shared.failed += 1
            self._shared.note_response()


def build_request(host: str, port: int, path: str, model: str, max_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    ).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_streams(
    shared: Shared,
    request: bytes,
    ns: argparse.Namespace,
    *,
    deadline: float = float("inf"),
) -> tuple[list[Stream], int]:
    """Open ``ns.streams`` streams in batches of ``ns.batch``; (streams, connect errors).

    Each batch goes out once the previous one has its response heads, so no
    listen backlog overflows however slow the server is to accept. Stops
    opening at ``deadline`` (monotonic s); ``shared.target`` is then the
    number of streams that did not fail.
    """
    loop = asyncio.get_running_loop()
    streams: list[Stream] = []
    connect_errors = 0
    for start in range(0, ns.streams, ns.batch):
        if time.monotonic() >= deadline:
            break
        count = min(ns.batch, ns.streams - start)
        results = await asyncio.gather(
            *(
                loop.create_connection(lambda: Stream(shared, request), ns.host, ns.port)
                for _ in range(count)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                connect_errors += 1
            else:
                streams.append(r[1])
        # Pace the ramp by the server: the next batch once this one is answered.
        shared.batch_end = len(streams)
        shared.batch_answered.clear()
        if shared.responded < shared.batch_end:
            wait_s = min(ns.batch_timeout_s, max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shared.batch_answered.wait(), wait_s)
    shared.target = len(streams) - shared.failed
    if shared.streaming >= shared.target:
        shared.all_streaming.set()
    if shared.first_events >= shared.target:
        shared.all_first.set()
    return streams, connect_errors


def gap_stats(gaps: Sequence[float]) -> dict[str, float]:
    """Percentiles of inter-event gaps, in ms."""
    s = sorted(gaps)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "p50_ms": percentile(s, 50) * 1e3,
        "p90_ms": percentile(s, 90) * 1e3,
        "p99_ms": percentile(s, 99) * 1e3,
        "p999_ms": percentile(s, 99.9) * 1e3,
        "max_ms": s[-1] * 1e3,
        "zero_share": sum(1 for g in s if g == 0.0) / len(s),
    }


async def measure(ns: argparse.Namespace) -> dict[str, object]:
    shared = Shared(target=ns.streams)
    request = build_request(ns.host, ns.port, ns.path, ns.model, ns.max_tokens)
    t_open = time.monotonic()
    streams, connect_errors = await open_streams(shared, request, ns)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shared.all_streaming.wait(), ns.ready_timeout_s)
    open_s = time.monotonic() - t_open
    await asyncio.sleep(ns.warmup_s)

    closed0 = shared.closed
    ev0 = shared.events
    t0 = time.monotonic()
    cpu0 = cpu_seconds(ns.pids)
    up0 = cpu_seconds(ns.upstream_pids)
    me0 = self_cpu_seconds()
    shared.recording = True
    await asyncio.sleep(ns.window_s)
    shared.recording = False
    ev1 = shared.events
    t1 = time.monotonic()
    cpu1 = cpu_seconds(ns.pids)
    up1 = cpu_seconds(ns.upstream_pids)
    me1 = self_cpu_seconds()
    rss = rss_bytes(ns.pids)
    closed_in_window = shared.closed - closed0

    close_all(streams)
    await asyncio.sleep(0.2)
    window = t1 - t0
    events = ev1 - ev0
    return {
        "streams_requested": ns.streams,
        "streams_streaming": shared.streaming,
        "connect_errors": connect_errors,
        "failed": shared.failed,
        "statuses": shared.statuses,
        "closed_in_window": closed_in_window,
        "open_s": open_s,
        "window_s": window,
        "events": events,
        "events_per_s": events / window,
        "target_cpu_s": cpu1 - cpu0,
        "upstream_cpu_s": up1 - up0,
        "loadgen_cpu_s": me1 - me0,
        "target_rss_bytes": rss,
        "gaps": gap_stats(shared.gaps),
    }


def close_all(streams: list[Stream]) -> None:
    for s in streams:
        if s.transport is not None:
            s.transport.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--model", default="sim-model")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--batch-timeout-s", type=float, default=10.0)
    p.add_argument("--ready-timeout-s", type=float, default=30.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--pids", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    p.add_argument(
        "--upstream-pids", type=lambda s: [int(x) for x in s.split(",") if x], default=[]
    )
    ns = p.parse_args()
    json.dump(run(measure(ns)), sys.stdout)


if __name__ == "__main__":
    main()
