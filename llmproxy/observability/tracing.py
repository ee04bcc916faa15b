"""OpenTelemetry tracing, optional (``pip install 'llmproxy[otel]'``).

One span per client request (kind SERVER, continuing the client's W3C
``traceparent`` when it sends one), a CLIENT child per upstream attempt whose
context is injected into the upstream request's headers so the replica joins
the trace, and an INTERNAL child ``stream`` from the first body byte to the
end of a streamed response::

    POST chat                      SERVER   llmproxy.request_id, http.*, outcome
    ├── attempt stable/gpu-1       CLIENT   pool, backend, attempt, status, outcome
    ├── attempt stable/gpu-2       CLIENT
    └── stream                     INTERNAL chunks, bytes

Cost when off: :meth:`Tracing.disabled` (also what :meth:`Tracing.from_config`
returns for ``enabled: false``) never imports OpenTelemetry; its
``start_request`` returns a shared, stateless no-op span whose methods do
nothing, so the request path calls the same methods either way without a
branch, or checks :attr:`Tracing.enabled` once and skips them.

Context is passed explicitly: every span holds its own OpenTelemetry
``Context`` and children are started from it, so nothing depends on
``contextvars`` being carried across tasks, and no global tracer provider or
propagator is installed (several gateways, or tests, can live in one process).

Sampling is ``ParentBased(TraceIdRatioBased(sample_ratio))``: the ratio
decides for requests that arrive without a ``traceparent``; a client that
sends one decides for its own trace (its sampled flag is followed). Finished
spans go through a ``BatchSpanProcessor``, which queues them (dropping when its
queue is full, never blocking) and exports OTLP http/protobuf from its own
thread. The OTLP exporter also honours the standard ``OTEL_EXPORTER_OTLP_*``
environment variables (headers, certificates, timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from llmproxy.config.schema import TracingConfig as TracingConfig  # noqa: PLC0414 - re-export

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# OpenTelemetry is imported inside functions (``noqa: PLC0415``) so that this
# module imports, and the disabled path runs, without the optional extra.
_INSTALL_HINT = "pip install 'llmproxy[otel]'"
_TRACE_HEADERS = ("traceparent", "tracestate")
_SERVER_ERRORS = frozenset({"upstream_error", "midstream_error", "timeout"})


class TracingUnavailableError(RuntimeError):
    """Tracing is enabled in the config but OpenTelemetry is not installed."""


# -- what the request path sees ---------------------------------------------------


class StreamSpan(Protocol):
    def end(self, outcome: str, *, chunks: int, bytes_sent: int, error: str | None = None) -> None:
        """At the end of the stream, with the counts the relay kept anyway
        (so there is no per-chunk call). Idempotent."""


class AttemptSpan(Protocol):
    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write ``traceparent`` (and ``tracestate``) for the upstream request,
        replacing any the client sent, in any letter case."""

    def end(self, outcome: str, status: int | None, error: str | None = None) -> None:
        """When the attempt's fate is known: failed, or committed (first byte
        sent to the client). Any outcome but ``ok`` marks the span as an
        error. Idempotent."""


class RequestSpan(Protocol):
    @property
    def trace_id(self) -> str | None:
        """32 hex digits (for the access log), ``None`` when tracing is off."""

    def set_route(self, route: str, pool: str) -> None:
        """Once the route is matched: names the span ``{method} {route}``."""

    def start_attempt(self, pool: str, backend: str, attempt_no: int) -> AttemptSpan:
        """``attempt_no`` counts from 1 across the whole request."""

    def start_stream(self) -> StreamSpan:
        """When the first body byte goes to the client of a streamed response."""

    def end(
        self,
        status: int | None,
        outcome: str,
        error: str | None = None,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Once, in the request's ``finally``; idempotent. A 5xx status or an
        ``upstream_error``/``midstream_error``/``timeout`` outcome marks the
        span as an error."""


class _NoopStream:
    __slots__ = ()

    def end(self, outcome: str, *, chunks: int, bytes_sent: int, error: str | None = None) -> None:
        return


class _NoopAttempt:
    __slots__ = ()

    def inject(self, headers: MutableMapping[str, str]) -> None:
        return

    def end(self, outcome: str, status: int | None, error: str | None = None) -> None:
        return


class _NoopRequest:
    __slots__ = ()

    @property
    def trace_id(self) -> str | None:
        return None

    def set_route(self, route: str, pool: str) -> None:
        return

    def start_attempt(self, pool: str, backend: str, attempt_no: int) -> AttemptSpan:
        return _NOOP_ATTEMPT

    def start_stream(self) -> StreamSpan:
        return _NOOP_STREAM

    def end(
        self,
        status: int | None,
        outcome: str,
        error: str | None = None,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        return


# Stateless and immutable, so sharing them is safe: the disabled path allocates nothing.
_NOOP_STREAM = _NoopStream()
_NOOP_ATTEMPT = _NoopAttempt()
_NOOP_REQUEST = _NoopRequest()
#: The span of a request when tracing is off (shared, stateless).
NOOP_SPAN: RequestSpan = _NOOP_REQUEST


# -- the facade ---------------------------------------------------------------------


class Tracing:
    """Build with :meth:`from_config`, :meth:`disabled` or :meth:`for_tests`."""

    def __init__(self, api: _Api | None, provider: TracerProvider | None) -> None:
        self._api = api
        self._provider = provider
        #: False: every span is a no-op; the request path may skip tracing calls.
        self.enabled = api is not None

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None, None)

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing:
        """Raises :class:`TracingUnavailableError` if enabled without the extra."""
        if not config.enabled:
            return cls.disabled()
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
            from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
        except ImportError as exc:
            raise TracingUnavailableError(
                f"tracing.enabled is true but OpenTelemetry is not installed: {_INSTALL_HINT}"
            ) from exc
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
        return cls._with_processor(
            BatchSpanProcessor(exporter), config.service_name, config.sample_ratio, True
        )

    @classmethod
    def for_tests(
        cls,
        exporter: SpanExporter,
        *,
        sample_ratio: float = 1.0,
        service_name: str = "llmproxy",
    ) -> Tracing:
        """Spans go synchronously to ``exporter`` (e.g. ``InMemorySpanExporter``)
        as each ends, so a test sees them at once."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415

        return cls._with_processor(SimpleSpanProcessor(exporter), service_name, sample_ratio, False)

    @classmethod
    def _with_processor(
        cls, processor: SpanProcessor, service_name: str, sample_ratio: float, at_exit: bool
    ) -> Tracing:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased  # noqa: PLC0415

        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create({"service.name": service_name}),
            shutdown_on_exit=at_exit,
        )
        provider.add_span_processor(processor)
        return cls(_Api.load(provider.get_tracer("llmproxy")), provider)

    def start_request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        request_id: str | None = None,
    ) -> RequestSpan:
        """``path`` without the query string; ``headers`` are the client's
        (only ``traceparent``/``tracestate`` are read)."""
        api = self._api
        if api is None:
            return _NOOP_REQUEST
        return _OtelRequest(api, method, path, headers, request_id)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued and stop. Blocks up to about ``timeout_s`` per
        step: call it from a worker thread (``asyncio.to_thread``). Idempotent."""
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.force_flush(int(timeout_s * 1000))
            provider.shutdown()


# -- the OpenTelemetry implementation ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Api:
    """The OpenTelemetry names the spans use, imported once, when enabled."""

    tracer: Tracer
    propagator: TraceContextTextMapPropagator
    new_context: Callable[[], Context]
    in_context: Callable[[Span, Context | None], Context]
    status: Callable[[StatusCode, str | None], Status]
    error: StatusCode
    server: SpanKind
    client: SpanKind
    internal: SpanKind

    @classmethod
    def load(cls, tracer: Tracer) -> _Api:
        from opentelemetry.context import Context  # noqa: PLC0415
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: PLC0415

        return cls(
            tracer=tracer,
            propagator=TraceContextTextMapPropagator(),
            new_context=Context,
            in_context=set_span_in_context,
            status=Status,
            error=StatusCode.ERROR,
            server=SpanKind.SERVER,
            client=SpanKind.CLIENT,
            internal=SpanKind.INTERNAL,
        )


class _OtelRequest:
    __slots__ = ("_api", "_ctx", "_ended", "_method", "_span")

    def __init__(
        self,
        api: _Api,
        method: str,
        path: str,
        headers: Mapping[str, str],
        request_id: str | None,
    ) -> None:
        parent = api.propagator.extract(_trace_carrier(headers), context=api.new_context())
        attributes: dict[str, str] = {"http.request.method": method, "url.path": path}
        if request_id is not None:
            attributes["llmproxy.request_id"] = request_id
        self._api = api
        self._method = method
        self._span = api.tracer.start_span(
            method, context=parent, kind=api.server, attributes=attributes
        )
        self._ctx = api.in_context(self._span, None)
        self._ended = False

    @property
    def trace_id(self) -> str | None:
        return format(self._span.get_span_context().trace_id, "032x")

    def set_route(self, route: str, pool: str) -> None:
        self._span.update_name(f"{self._method} {route}")
        self._span.set_attribute("llmproxy.route", route)
        self._span.set_attribute("llmproxy.pool", pool)

    def start_attempt(self, pool: str, backend: str, attempt_no: int) -> AttemptSpan:
        return _OtelAttempt(self._api, self._ctx, pool, backend, attempt_no)

    def start_stream(self) -> StreamSpan:
        return _OtelStream(self._api, self._ctx)

    def end(
        self,
        status: int | None,
        outcome: str,
        error: str | None = None,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("llmproxy.outcome", outcome)
        if prompt_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
        if completion_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        # A server span is an error for 5xx or a failure after the commit point;
        # 4xx, rate limits and clients leaving are not the gateway's failures.
        if (status is not None and status >= 500) or outcome in _SERVER_ERRORS:
            span.set_attribute("error.type", outcome if status is None else str(status))
            span.set_status(self._api.status(self._api.error, error or outcome))
        span.end()


class _OtelAttempt:
    __slots__ = ("_api", "_ctx", "_ended", "_span")

    def __init__(self, api: _Api, parent: Context, pool: str, backend: str, n: int) -> None:
        self._api = api
        self._span = api.tracer.start_span(
            f"attempt {pool}/{backend}",
            context=parent,
            kind=api.client,
            attributes={"llmproxy.pool": pool, "llmproxy.backend": backend, "llmproxy.attempt": n},
        )
        self._ctx = api.in_context(self._span, None)
        self._ended = False

    def inject(self, headers: MutableMapping[str, str]) -> None:
        carrier: dict[str, str] = {}
        self._api.propagator.inject(carrier, context=self._ctx)
        stale = {k for k in headers if k.lower() in _TRACE_HEADERS}
        for key in stale:
            while key in headers:  # a multidict may hold the name more than once
                del headers[key]
        headers.update(carrier)

    def end(self, outcome: str, status: int | None, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("llmproxy.outcome", outcome)
        if outcome != "ok":
            span.set_attribute("error.type", outcome)
            span.set_status(self._api.status(self._api.error, error or outcome))
        span.end()


class _OtelStream:
    __slots__ = ("_api", "_ended", "_span")

    def __init__(self, api: _Api, parent: Context) -> None:
        self._api = api
        self._span = api.tracer.start_span("stream", context=parent, kind=api.internal)
        self._ended = False

    def end(self, outcome: str, *, chunks: int, bytes_sent: int, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
        span.set_attribute("llmproxy.stream.chunks", chunks)
        span.set_attribute("llmproxy.stream.bytes", bytes_sent)
        span.set_attribute("llmproxy.outcome", outcome)
        if outcome != "ok":
            span.set_attribute("error.type", outcome)
            span.set_status(self._api.status(self._api.error, error or outcome))
        span.end()


def _trace_carrier(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's trace headers under lower-case names, whatever mapping
    holds them (aiohttp's is case-insensitive; a plain dict is not)."""
    carrier: dict[str, str] = {}
    getall = getattr(headers, "getall", None)
    for name in _TRACE_HEADERS:
        if getall is not None:  # a multidict: tracestate may be split over lines
            values: list[str] = getall(name, [])
            if values:
                carrier[name] = values[0] if name == "traceparent" else ",".join(values)
            continue
        value = headers.get(name)
        if value is None:
            value = next((v for k, v in headers.items() if k.lower() == name), None)
        if value is not None:
            carrier[name] = value
    return carrier
