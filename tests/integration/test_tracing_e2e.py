"""OpenTelemetry tracing end to end: the gateway runs in this process (so its
spans reach an in-memory exporter), the replicas are real sim processes that
record the ``traceparent`` they were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmproxy.app import make_runner
from llmproxy.config import parse_config
from llmproxy.gateway import Gateway
from llmproxy.observability.tracing import Tracing
from tests.support import Sim, http

MODEL = "sim-model"
T = TypeVar("T")


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, Sim]]:
    tmp = tmp_path_factory.mktemp("trace-sims")
    args = ("--model", MODEL, "--ttft-ms", "5", "--tokens-per-s", "200")
    a, b = Sim(tmp, *args, name="sim-a"), Sim(tmp, *args, name="sim-b")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(autouse=True)
def _restore_faults(sims: tuple[Sim, Sim]) -> Iterator[None]:
    yield
    for s in sims:
        assert http("DELETE", f"{s.url}/sim/faults")[0] == 200


@contextlib.asynccontextmanager
async def gateway(
    sims: tuple[Sim, Sim], exporter: InMemorySpanExporter, **extra: Any
) -> AsyncIterator[str]:
    """The gateway on 127.0.0.1 port 0 in this event loop; yields its URL."""
    a, b = sims
    config = {
        "pools": {
            "main": {
                "balancer": "round_robin",
                "backends": [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                "health": {"enabled": False},
            }
        },
        "routes": [{"name": "chat", "match": {"model": MODEL}, "pool": "main"}],
        **extra,
    }
    gw = Gateway(parse_config(config, {}))
    gw.tracing = Tracing.for_tests(exporter)  # read by Gateway.start()
    runner = make_runner(gw)
    await runner.setup()
    try:
        await runner.listen("127.0.0.1", 0)
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def eventually(condition: Callable[[], T | None], what: str, within_s: float = 5.0) -> T:
    """Poll ``condition`` with a deadline, yielding to the loop the gateway runs on."""
    deadline = time.monotonic() + within_s
    while (result := condition()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return result


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def request_span(spans: Sequence[ReadableSpan], request_id: str) -> ReadableSpan | None:
    return next(
        (
            s
            for s in spans
            if s.kind is SpanKind.SERVER and attrs(s).get("llmproxy.request_id") == request_id
        ),
        None,
    )


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id
    return [s for s in spans if s.parent is not None and s.parent.span_id == pid]


def traceparent_seen(sim: Sim) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of the replica's latest request."""
    version, trace_id, span_id, flags = sim.stats()["last_headers"]["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)  # other bits: W3C level 2 "random"


def chat(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "trace me"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def test_streamed_request_spans_and_traceparent(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    log_path = tmp_path / "access.log"
    access_log = {"enabled": True, "path": str(log_path), "flush_interval_s": 0.02}
    async with (
        gateway(sims, exporter, access_log=access_log) as url,
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/v1/chat/completions", json=chat(6, stream=True), headers={"X-Request-Id": "t-1"}
        ) as r,
    ):
        assert r.status == 200
        body = await r.read()
        assert body.rstrip().endswith(b"data: [DONE]")
        backend = r.headers["x-llmproxy-backend"]
        spans = exporter.get_finished_spans
        root = await eventually(lambda: request_span(spans(), "t-1"), "the request span")
        line = await eventually(
            lambda: log_path.read_text() or None if log_path.exists() else None,
            "the access log line",
        )

    spans = exporter.get_finished_spans
    assert root.name == "POST chat"
    assert root.parent is None
    assert root.status.status_code is StatusCode.UNSET
    root_attrs = attrs(root)
    assert root_attrs["http.response.status_code"] == 200
    assert root_attrs["llmproxy.outcome"] == "ok"
    assert (root_attrs["llmproxy.route"], root_attrs["llmproxy.pool"]) == ("chat", "main")

    kids = {s.kind: s for s in children(spans(), root)}
    assert len(kids) == len(children(spans(), root)) == 2, children(spans(), root)
    attempt, stream = kids[SpanKind.CLIENT], kids[SpanKind.INTERNAL]
    assert attempt.name == f"attempt main/{backend}"
    assert attrs(attempt)["llmproxy.backend"] == backend
    assert attrs(attempt)["llmproxy.attempt"] == 1
    assert attrs(attempt)["llmproxy.outcome"] == "ok"
    assert stream.name == "stream"
    stream_attrs = attrs(stream)
    assert stream_attrs["llmproxy.outcome"] == "ok"
    assert stream_attrs["llmproxy.stream.bytes"] == len(body)
    assert stream_attrs["llmproxy.stream.chunks"] >= 1
    trace_id = format(root.context.trace_id, "032x")
    assert {s.context.trace_id for s in spans()} == {root.context.trace_id}

    # The replica was sent the attempt's context: same trace, the attempt as parent.
    served = sims[0] if backend == "a" else sims[1]
    assert traceparent_seen(served) == (trace_id, format(attempt.context.span_id, "016x"), True)
    # The access log line joins the trace.
    assert json.loads(line.splitlines()[0])["trace_id"] == trace_id


async def test_retried_request_has_one_attempt_span_per_attempt(sims: tuple[Sim, Sim]) -> None:
    a, b = sims
    a.faults(error_rate=1.0, error_status=503)
    exporter = InMemorySpanExporter()
    async with gateway(sims, exporter) as url, aiohttp.ClientSession() as s:
        for i in range(3):  # round robin: one of the first two lands on a
            rid = f"retry-{i}"
            async with s.post(
                f"{url}/v1/chat/completions", json=chat(2), headers={"X-Request-Id": rid}
            ) as r:
                assert r.status == 200, await r.text()
                if r.headers["x-llmproxy-attempts"] == "2":
                    break
        else:
            pytest.fail("no request was retried")
        spans = exporter.get_finished_spans
        root = await eventually(lambda: request_span(spans(), rid), "the request span")

    attempts = sorted(children(spans(), root), key=lambda s: attrs(s)["llmproxy.attempt"])
    assert [s.name for s in attempts] == ["attempt main/a", "attempt main/b"]
    assert all(s.kind is SpanKind.CLIENT for s in attempts)
    failed, ok = attempts
    failed_attrs, ok_attrs = attrs(failed), attrs(ok)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed_attrs["http.response.status_code"] == 503
    assert failed_attrs["llmproxy.outcome"] == "upstream_error"
    assert ok.status.status_code is StatusCode.UNSET
    assert (ok_attrs["llmproxy.outcome"], ok_attrs["http.response.status_code"]) == ("ok", 200)
    # The request itself succeeded: its span is not an error.
    assert root.status.status_code is StatusCode.UNSET
    assert attrs(root)["http.response.status_code"] == 200
    assert failed.end_time is not None
    assert ok.start_time is not None
    assert failed.end_time <= ok.start_time

    # Each replica saw the context of its own attempt, in the same trace.
    trace_id = format(root.context.trace_id, "032x")
    assert traceparent_seen(a) == (trace_id, format(failed.context.span_id, "016x"), True)
    assert traceparent_seen(b) == (trace_id, format(ok.context.span_id, "016x"), True)


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "not-sampled"])
async def test_incoming_traceparent_is_continued(sims: tuple[Sim, Sim], sampled: bool) -> None:
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    flags = "01" if sampled else "00"
    headers = {
        "traceparent": f"00-{trace_id}-{parent_id}-{flags}",
        "tracestate": "vendor=abc",
        "X-Request-Id": "cont-1",
    }
    exporter = InMemorySpanExporter()
    async with (
        gateway(sims, exporter) as url,
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/chat/completions", json=chat(2), headers=headers) as r,
    ):
        assert r.status == 200
        await r.read()
        backend = r.headers["x-llmproxy-backend"]
        if sampled:
            spans = exporter.get_finished_spans
            root = await eventually(lambda: request_span(spans(), "cont-1"), "the request span")

    served = sims[0] if backend == "a" else sims[1]
    seen_trace, seen_parent, seen_sampled = traceparent_seen(served)
    # The client's trace goes on upstream, under a span of the gateway's own.
    assert (seen_trace, seen_sampled) == (trace_id, sampled)
    assert seen_parent != parent_id
    assert served.stats()["last_headers"]["tracestate"] == "vendor=abc"
    if not sampled:  # the caller's decision is followed: nothing recorded
        assert exporter.get_finished_spans() == ()
        return
    assert format(root.context.trace_id, "032x") == trace_id
    assert root.parent is not None
    assert root.parent.is_remote
    assert format(root.parent.span_id, "016x") == parent_id
    (attempt,) = children(spans(), root)
    assert seen_parent == format(attempt.context.span_id, "016x")
