from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from llmproxy.observability.tracing import Tracing, TracingConfig

try:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    HAVE_OTEL = True
except ImportError:
    HAVE_OTEL = False

ROOT = Path(__file__).resolve().parents[3]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    if not HAVE_OTEL:
        pytest.fail(
            "OpenTelemetry is not installed; these tests need it: pip install -e '.[otel,test]'"
        )
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    tr = Tracing.for_tests(exporter)
    yield tr
    tr.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = exporter.get_finished_spans()
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), "span names are not unique"
    return named


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """(trace id, span id) in the hex of a ``traceparent``."""
    ctx = span.get_span_context()
    assert ctx is not None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def parse_traceparent(value: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    return trace_id, span_id, flags


def one_request(tracing: Tracing, headers: MutableMapping[str, str]) -> dict[str, str]:
    """A streamed request whose first attempt fails and second one commits."""
    req = tracing.start_request("POST", "/v1/chat/completions", headers, request_id="req-1")
    req.set_route("chat", "stable")
    first = req.start_attempt("stable", "gpu-1", 1)
    first.inject(headers)
    first.end("upstream_error", 503, "503 from upstream")
    second = req.start_attempt("stable", "gpu-2", 2)
    upstream: dict[str, str] = {}
    second.inject(upstream)
    second.end("ok", 200)
    stream = req.start_stream()
    stream.end("ok", chunks=42, bytes_sent=5000)
    req.end(200, "ok", prompt_tokens=12, completion_tokens=40)
    return upstream


# -- structure ---------------------------------------------------------------------


def test_request_attempts_and_stream_form_one_tree(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    one_request(tracing, {})
    spans = by_name(exporter)
    assert set(spans) == {"POST chat", "attempt stable/gpu-1", "attempt stable/gpu-2", "stream"}
    root = spans["POST chat"]
    first, second = spans["attempt stable/gpu-1"], spans["attempt stable/gpu-2"]
    stream = spans["stream"]

    assert root.parent is None  # no traceparent came in: a new trace
    assert root.kind is SpanKind.SERVER
    assert (first.kind, second.kind, stream.kind) == (
        SpanKind.CLIENT,
        SpanKind.CLIENT,
        SpanKind.INTERNAL,
    )
    root_trace, root_span = hex_ids(root)
    for child in (first, second, stream):
        assert child.parent is not None
        assert format(child.parent.span_id, "016x") == root_span
        assert hex_ids(child)[0] == root_trace
    assert len({hex_ids(s)[1] for s in spans.values()}) == 4

    assert dict(root.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "llmproxy.request_id": "req-1",
        "llmproxy.route": "chat",
        "llmproxy.pool": "stable",
        "http.response.status_code": 200,
        "llmproxy.outcome": "ok",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 40,
    }
    assert root.status.status_code is StatusCode.UNSET
    assert dict(first.attributes or {}) == {
        "llmproxy.pool": "stable",
        "llmproxy.backend": "gpu-1",
        "llmproxy.attempt": 1,
        "http.response.status_code": 503,
        "llmproxy.outcome": "upstream_error",
        "error.type": "upstream_error",
    }
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "503 from upstream"
    assert second.status.status_code is StatusCode.UNSET
    assert (second.attributes or {})["llmproxy.attempt"] == 2
    assert dict(stream.attributes or {}) == {
        "llmproxy.stream.chunks": 42,
        "llmproxy.stream.bytes": 5000,
        "llmproxy.outcome": "ok",
    }
    # The stream runs from first byte to end: inside the request, after the attempts.
    times = [root.start_time, second.end_time, stream.start_time, stream.end_time, root.end_time]
    assert None not in times
    assert times == sorted(times)  # type: ignore[type-var]


def test_service_name_is_on_the_resource(exporter: InMemorySpanExporter) -> None:
    tr = Tracing.for_tests(exporter, service_name="gw-eu")
    tr.start_request("GET", "/v1/models", {}).end(200, "ok")
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "gw-eu"


# -- propagation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": TRACEPARENT},
        {"Traceparent": TRACEPARENT, "Host": "gw"},  # a plain dict, another case
        CIMultiDict({"TRACEPARENT": TRACEPARENT}),  # aiohttp's request headers
    ],
    ids=["dict", "dict-titlecase", "multidict"],
)
def test_incoming_traceparent_is_continued(
    tracing: Tracing, exporter: InMemorySpanExporter, headers: MutableMapping[str, str]
) -> None:
    upstream = one_request(tracing, headers)
    spans = by_name(exporter)
    root = spans["POST chat"]
    assert root.parent is not None
    assert root.parent.is_remote
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert {hex_ids(s)[0] for s in spans.values()} == {TRACE_ID}
    # ... and the replica sees the same trace, under the attempt that called it.
    trace_id, span_id, flags = parse_traceparent(upstream["traceparent"])
    assert (trace_id, span_id) == hex_ids(spans["attempt stable/gpu-2"])
    assert int(flags, 16) & 0x01  # sampled


def test_inject_writes_the_attempt_and_replaces_the_clients_headers(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    req = tracing.start_request("POST", "/v1/completions", {})
    for headers in (
        {"Traceparent": TRACEPARENT, "TraceState": "client=1", "X-Other": "kept"},
        CIMultiDict(
            [("traceparent", TRACEPARENT), ("Tracestate", "client=1"), ("X-Other", "kept")]
        ),
    ):
        attempt = req.start_attempt("p", "b", 1)
        attempt.inject(headers)
        attempt.end("ok", 200)
        keys = [k.lower() for k in headers]
        assert sorted(keys) == ["traceparent", "x-other"]  # no stale tracestate, no duplicate
        assert headers["X-Other"] == "kept"
        (span,) = [s for s in exporter.get_finished_spans() if s.name == "attempt p/b"][-1:]
        assert parse_traceparent(headers["traceparent"])[:2] == hex_ids(span)
        assert hex_ids(span)[0] == req.trace_id
    req.end(200, "ok")


def test_tracestate_travels_to_the_replica(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    headers = CIMultiDict(
        [("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")]
    )
    req = tracing.start_request("POST", "/v1/completions", headers)
    attempt = req.start_attempt("p", "b", 1)
    upstream: dict[str, str] = {}
    attempt.inject(upstream)
    assert upstream["tracestate"] == "a=1,b=2"
    assert parse_traceparent(upstream["traceparent"])[0] == TRACE_ID


@pytest.mark.parametrize(
    "bad", ["garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"ff-{TRACE_ID}-{PARENT_ID}-01"]
)
def test_a_malformed_traceparent_starts_a_new_trace(
    tracing: Tracing, exporter: InMemorySpanExporter, bad: str
) -> None:
    tracing.start_request("GET", "/", {"traceparent": bad}).end(200, "ok")
    (root,) = exporter.get_finished_spans()
    assert root.parent is None
    assert hex_ids(root)[0] != TRACE_ID


# -- sampling ----------------------------------------------------------------------------


def test_unsampled_requests_record_nothing_but_pass_the_decision_on(
    exporter: InMemorySpanExporter,
) -> None:
    tr = Tracing.for_tests(exporter, sample_ratio=0.0)
    upstream = one_request(tr, {})
    assert exporter.get_finished_spans() == ()
    flags = int(parse_traceparent(upstream["traceparent"])[2], 16)
    assert flags & 0x01 == 0  # "not sampled" (0x02, W3C level 2 "random", may be set)


def test_a_sampled_client_trace_is_followed_whatever_the_ratio(
    exporter: InMemorySpanExporter,
) -> None:
    tr = Tracing.for_tests(exporter, sample_ratio=0.0)
    one_request(tr, {"traceparent": TRACEPARENT})
    assert len(exporter.get_finished_spans()) == 4


# -- status and idempotence ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome", "error"),
    [
        (200, "ok", False),
        (400, "rejected", False),
        (429, "ratelimited", False),
        (499, "client_closed", False),
        (502, "upstream_error", True),
        (504, "timeout", True),
        (200, "midstream_error", True),  # failed after the commit point
        (None, "timeout", True),
    ],
)
def test_request_span_errors_are_the_gateways_failures(
    tracing: Tracing,
    exporter: InMemorySpanExporter,
    status: int | None,
    outcome: str,
    error: bool,
) -> None:
    tracing.start_request("POST", "/", {}).end(status, outcome, "why")
    (span,) = exporter.get_finished_spans()
    assert (span.status.status_code is StatusCode.ERROR) is error
    assert ("error.type" in (span.attributes or {})) is error
    assert (span.attributes or {}).get("http.response.status_code") == status


def test_every_end_is_idempotent(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    req = tracing.start_request("POST", "/", {})
    attempt = req.start_attempt("p", "b", 1)
    stream = req.start_stream()
    for _ in range(2):
        attempt.end("ok", 200)
        stream.end("client_closed", chunks=1, bytes_sent=10)
        req.end(499, "client_closed")
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    stream_span = next(s for s in spans if s.name == "stream")
    assert stream_span.status.status_code is StatusCode.ERROR


def test_trace_id_is_the_spans(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    req = tracing.start_request("GET", "/", {})
    trace_id = req.trace_id
    req.end(200, "ok")
    (span,) = exporter.get_finished_spans()
    assert trace_id == hex_ids(span)[0]


# -- the configured pipeline: batch processor + OTLP http/protobuf -------------------------


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_from_config_exports_otlp_to_the_configured_endpoint(
    exporter: InMemorySpanExporter,  # only to fail clearly without the extra
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    bodies: list[tuple[str, bytes]] = []
    handler = type("Collector", (_Collector,), {"bodies": bodies})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/traces"
        tr = Tracing.from_config(
            TracingConfig(enabled=True, service_name="gw", otlp_endpoint=url, sample_ratio=0.5)
        )
        assert tr.enabled
        one_request(tr, {"traceparent": TRACEPARENT})  # sampled by the client
        tr.shutdown()  # flushes the batch processor
        tr.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert bodies, "nothing reached the collector"
    names = []
    for path, body in bodies:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert service["service.name"] == "gw"
            names += [s.name for ss in resource_spans.scope_spans for s in ss.spans]
    assert sorted(names) == ["POST chat", "attempt stable/gpu-1", "attempt stable/gpu-2", "stream"]


def test_from_config_uses_a_parent_based_ratio_sampler(exporter: InMemorySpanExporter) -> None:
    tr = Tracing.from_config(TracingConfig(enabled=True, sample_ratio=0.25))
    try:
        provider = tr._provider
        assert provider is not None
        description = provider.sampler.get_description()
        assert description.startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    finally:
        tr.shutdown()


# -- disabled: nothing made, nothing imported ------------------------------------------------


def test_disabled_tracing_creates_and_allocates_nothing() -> None:
    tr = Tracing.from_config(TracingConfig(enabled=False))
    assert not tr.enabled
    headers = {"traceparent": TRACEPARENT}

    def request() -> None:
        req = tr.start_request("POST", "/v1/chat/completions", headers, request_id="r")
        req.set_route("chat", "stable")
        attempt = req.start_attempt("stable", "gpu-1", 1)
        attempt.inject(headers)
        attempt.end("ok", 200)
        req.start_stream().end("ok", chunks=3, bytes_sent=30)
        req.end(200, "ok")

    request()
    assert headers == {"traceparent": TRACEPARENT}  # inject wrote nothing
    first = tr.start_request("GET", "/", {})
    assert first is tr.start_request("GET", "/", {})  # one shared no-op span
    assert first.trace_id is None

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(10_000):
            request()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Nothing per request: 10,000 requests would show as hundreds of KiB.
    assert peak - before < 4096


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_module_works_without_opentelemetry() -> None:
    result = _run_python(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the extra were not installed
        from llmproxy.observability.tracing import (
            Tracing, TracingConfig, TracingUnavailableError,
        )
        tr = Tracing.from_config(TracingConfig())
        assert not tr.enabled
        headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        req = tr.start_request("POST", "/v1/chat/completions", headers)
        attempt = req.start_attempt("p", "b", 1)
        attempt.inject(headers)
        attempt.end("ok", 200)
        req.start_stream().end("ok", chunks=1, bytes_sent=1)
        req.end(200, "ok")
        assert len(headers) == 1
        try:
            Tracing.from_config(TracingConfig(enabled=True))
        except TracingUnavailableError as exc:
            assert "pip install" in str(exc), exc
        else:
            raise SystemExit("enabled tracing without OpenTelemetry did not fail")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_disabled_tracing_does_not_import_opentelemetry() -> None:
    result = _run_python(
        """
        import sys
        from llmproxy.observability.tracing import Tracing, TracingConfig
        tr = Tracing.from_config(TracingConfig(enabled=False))
        tr.start_request("GET", "/", {}).end(200, "ok")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        print(loaded)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
