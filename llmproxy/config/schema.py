"""The configuration schema: frozen, slotted dataclasses.

Everything here is built once, by :mod:`llmproxy.config.loader`, from a YAML
file that has already been validated; the rest of the gateway only reads it.
Durations are seconds (``*_s``), sizes are bytes, weights are relative and > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BALANCERS = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "power_of_two",
    "random",
    "consistent_hash",
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest request body accepted, in bytes; larger bodies get a 413.
    max_body_bytes: int = 8 * 1024 * 1024
    #: How long a graceful shutdown waits for in-flight requests.
    drain_timeout_s: float = 30.0
    workers: int = 1
    #: Whether the client's ``X-Forwarded-For`` is believed when an ``ip`` key
    #: (rate limits, ``sticky: ip``, ``hash_key: ip``) is worked out. Only true
    #: behind a load balancer that sets it: otherwise any client can name any IP.
    trust_forwarded_for: bool = False
    #: The main listener's HTTP/1.1 server: ``httptools`` (llhttp, ours) or
    #: ``aiohttp`` (aiohttp's low-level server).
    http: str = "httptools"
    #: How long an idle client connection is kept open for its next request;
    #: also how long the client may go quiet within a request head (then the
    #: connection is closed) or body (then a 408). aiohttp's server applies
    #: it between requests only.
    keepalive_timeout_s: float = 75.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    #: Bearer token for ``/admin/...``; ``None`` leaves it open (loopback only).
    token: str | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str
    weight: float = 1.0
    #: Stable name used in metrics, headers and the admin API; ``host:port``
    #: of the URL unless set.
    name: str = ""


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = "/health"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    enabled: bool = True
    #: Each interval is stretched or shrunk at random by up to this share, so
    #: checks of many backends (and many gateways) do not align.
    jitter: float = 0.2
    #: Deep check: a one-token completion every ``deep_interval_s`` (0 = off),
    #: skipped while the backend serves traffic, so it never competes with users.
    deep_interval_s: float = 0.0
    deep_timeout_s: float = 30.0
    deep_path: str = "/v1/completions"
    #: Model named in the deep check; empty = the first of the backend's /v1/models.
    deep_model: str = ""


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    reset_timeout_s: float = 10.0
    half_open_max_calls: int = 1


@dataclass(frozen=True, slots=True)
class RetryConfig:
    #: Total attempts per request, the first included (1 = no retry).
    attempts: int = 3
    #: Retries may be at most this share of recent requests (plus ``min_retries``).
    budget_ratio: float = 0.2
    min_retries: int = 3
    #: Retry a 429 from a backend on another backend.
    retry_on_429: bool = False
    backoff_base_s: float = 0.01
    backoff_max_s: float = 0.5
    #: A backend's ``Retry-After`` (on 429/503) is honoured up to this long.
    retry_after_max_s: float = 2.0
    #: The "recent requests" the budget is a share of.
    budget_window_s: float = 10.0


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive outlier detection (Envoy's outlier_detection)."""

    #: Consecutive failed requests (connect error, timeout, 5xx) that eject.
    consecutive_failures: int = 5
    #: An ejection lasts ``base_ejection_s`` times the number of ejections so far,
    #: up to ``max_ejection_s``.
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    #: At most this share of a pool is ejected at once (at least one may be).
    max_ejection_percent: float = 50.0
    #: A backend whose smoothed time to first byte exceeds this multiple of the
    #: pool's median has its weight cut in proportion; 0 turns it off.
    latency_factor: float = 3.0
    #: Samples a backend needs before its latency is judged.
    latency_min_samples: int = 10
    #: Smoothing of the time to first byte (weight of the newest sample).
    latency_alpha: float = 0.2
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """``pools.NAME.autoscale``: saturation signals for a replica autoscaler."""

    enabled: bool = True
    #: How often each replica's /metrics (vLLM's queue gauges) is scraped.
    scrape_interval_s: float = 5.0
    #: A scraped value older than this no longer counts.
    stale_after_s: float = 15.0
    #: In-flight requests one replica should carry; sets the desired replica count.
    target_in_flight_per_replica: float = 8.0
    metrics_path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``cluster:``: gateway instances share "backend down" news through Redis."""

    enabled: bool = False
    #: A redis:// URL; required when enabled.
    redis: str | None = None
    channel: str = "llmproxy:news"
    #: This instance's id in messages; empty: hostname-pid.
    instance: str = ""


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """``pools.NAME.timeouts``. The first-byte, idle and total timeouts run on
    coalesced timers: each fires within a tenth of its length after its
    deadline (within 10 ms for those under 100 ms)."""

    connect_s: float = 2.0
    #: From sending the request to the first byte of the response body.
    first_byte_s: float = 60.0
    #: Longest silence between two chunks of a response body.
    idle_s: float = 30.0
    #: Whole request, stream included.
    total_s: float = 600.0


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """``pools.NAME.discovery``: the pool's backends are the addresses of a DNS name.

    On Kubernetes, a headless Service: it resolves to the ready pods. The
    discovered list replaces the pool's backends, each named ``ip:port``.
    """

    #: The name to resolve, e.g. ``vllm-headless.ns.svc.cluster.local``.
    dns: str
    #: The port of every discovered address (A and AAAA records carry none), 1..65535.
    port: int
    scheme: str = "http"
    #: Seconds between two lookups.
    refresh_s: float = 10.0
    #: Answers with no address needed in a row before the pool is emptied, so
    #: that one DNS blip does not drain the pool.
    empty_after: int = 3
    #: A lookup slower than this (seconds) is a failure: the last good list stays.
    timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    #: Empty when the backends come from ``discovery``.
    backends: tuple[BackendConfig, ...]
    balancer: str = "least_connections"
    #: For ``consistent_hash``: where the key comes from, as ``header:NAME``,
    #: ``api_key``, ``ip`` or ``model``.
    hash_key: str = "header:x-user-id"
    health: HealthConfig = field(default_factory=HealthConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    #: A backend that joins or returns ramps its weight up over this long (its
    #: prefix cache is cold); 0 turns it off.
    slow_start_s: float = 10.0
    #: With no eligible backend: False refuses at once (503); True tries the
    #: backend that failed least recently (Envoy's panic routing).
    panic_mode: bool = False
    #: Sent to the pool's replicas as ``Authorization: Bearer ...`` (vLLM's
    #: ``--api-key``), in place of the client's; ``None`` sends none of its own.
    #: A secret: kept out of ``repr``.
    api_key: str | None = field(default=None, repr=False)
    #: Backends from DNS instead of (or starting from an empty) ``backends``.
    discovery: DiscoveryConfig | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """All given conditions must hold; an empty match matches everything."""

    #: Exact model name, a glob such as ``llama-*``, or ``*``.
    model: str | None = None
    path_prefix: str | None = None
    #: ``(header name lower-cased, exact value)``.
    header: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class SplitTarget:
    pool: str
    weight: float


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    """``routes[i].canary``: automatic analysis of a canary against the stable pool.

    Both pools are in the route's split; the analyser moves the canary's share
    through ``steps`` while it stays within the margins and sets it to 0 when
    it does not.
    """

    canary_pool: str
    stable_pool: str
    #: Seconds of outcomes compared.
    window_s: float = 60.0
    #: Outcomes needed on each side within the window before any verdict.
    min_samples: int = 50
    #: Absolute: canary 8 % vs stable 2 % is +0.06, over 0.05 → rollback.
    max_error_rate_increase: float = 0.05
    #: Canary TTFB p95 over stable TTFB p95 above this → rollback; at least 1.
    max_ttfb_p95_ratio: float = 1.5
    #: Canary weights in percent, each in (0, 100], rising strictly, e.g.
    #: (5, 25, 50, 100); () = no promotion.
    steps: tuple[float, ...] = ()
    #: Seconds within the margins before the next step.
    step_interval_s: float = 300.0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: RouteMatch
    split: tuple[SplitTarget, ...]
    #: ``header:NAME``, ``api_key``, ``ip`` or ``none``.
    sticky: str = "none"
    #: Pools tried, in order, when the split's pool cannot serve the request.
    fallback: tuple[str, ...] = ()
    canary: CanaryConfig | None = None


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    #: ``api_key``, ``ip``, ``route``, ``global`` or ``header:NAME``.
    key: str
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None
    #: Shown in metrics and logs; unique among the rules when set.
    name: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    #: ``memory`` or a ``redis://`` / ``rediss://`` URL.
    store: str = "memory"
    #: ``allow`` or ``deny`` while the store cannot be reached.
    on_store_error: str = "allow"
    rules: tuple[RateLimitRule, ...] = ()
    #: A Redis call slower than this (seconds) counts as a store error.
    redis_timeout_s: float = 0.1
    #: Prepended to every Redis key, so that gateways can share one Redis.
    key_prefix: str = "llmproxy:rl"


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """One entry of ``auth.keys``. Limits are per key; ``None`` means unlimited."""

    name: str
    #: SHA-256 of the key, 64 lower-case hex digits (``llmproxy hash-key``).
    sha256: str
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None
    #: The key may pick a pool directly (header override), for smoke tests.
    can_target_pool: bool = False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``auth:``: client API keys; with ``enabled`` at least one key is required."""

    enabled: bool = False
    keys: tuple[ApiKeyConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """``access_log:``: one JSON line per finished request."""

    enabled: bool = True
    #: ``-`` for stdout, else a file opened for appending.
    path: str = "-"
    #: Include the prompt, cut to ``prompt_max_chars`` characters. Off by
    #: default: prompts are user data and may hold secrets.
    log_prompts: bool = False
    prompt_max_chars: int = 200
    #: Entries allowed to wait for the writer; more are dropped and counted.
    max_pending: int = 10_000
    #: Seconds the writer lets a batch gather once a line is waiting (it
    #: sleeps while none is): a line is written at most about this long after
    #: its request ended. Lines are formatted on the event loop as requests
    #: end; the writer only joins and writes them, so the interval trades
    #: write calls against how soon a line reaches the sink.
    flush_interval_s: float = 0.005


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``tracing:``: OpenTelemetry spans, exported over OTLP/HTTP."""

    enabled: bool = False
    #: ``service.name`` of the spans.
    service_name: str = "llmproxy"
    #: An http(s) URL, e.g. ``http://collector:4318/v1/traces``; ``None`` leaves
    #: it to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or the exporter's default.
    otlp_endpoint: str | None = None
    #: Share of new traces (no incoming ``traceparent``) recorded, 0..1.
    sample_ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class Config:
    pools: dict[str, PoolConfig]
    routes: tuple[RouteConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    #: The file this was loaded from, for reloads; ``None`` when built in code.
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str | None = None
