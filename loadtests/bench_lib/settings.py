"""What one benchmark run is: its fixed parameters and its settings.

Shared by the driver (``bench.py``) and the modules that run the
measurements and render the report.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: ``loadtests/``: on ``PYTHONPATH`` of the helper processes (``python -m bench_lib.X``).
HERE = Path(__file__).resolve().parents[1]
MODEL = "sim-model"
SMALL_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
)
#: The streamed request of the time-to-first-token measurement.
TTFT_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "stream": True,
    }
)
PATH = "/v1/chat/completions"
SSE_TOKENS_PER_S = 20.0
#: The replica of the idle and hold measurements: the first event at once, the
#: second 100 s later, so an open stream holds its connections without traffic.
HOLD_TOKENS_PER_S = 0.01
HOLD_MAX_TOKENS = 2
#: Seconds a stream lasts beyond warm-up and window: covers opening 1,000 streams.
#: (The replica builds every token up front, ~2 µs each: keep streams no longer.)
SSE_MARGIN_S = 25.0
UPSTREAM_READY = r"listening on http://([\d.]+):(\d+)"
MEASUREMENTS = ("latency", "throughput", "ttft", "sse", "idle", "hold", "workers")
#: Gateway processes compared by the workers measurement (``server.workers``).
WORKER_COUNTS = (1, 2)


@dataclass(frozen=True, slots=True)
class Settings:
    runs: int
    latency_requests: int
    latency_warmup: int
    wrk_seconds: int
    wrk_warmup_seconds: int
    wrk_connections: int
    sse_streams: int
    sse_window_s: float
    sse_warmup_s: float
    upstream: str
    proxy_cores: frozenset[int] | None
    load_cores: frozenset[int] | None
    measurements: tuple[str, ...]
    #: The checkout whose gateway and simulated replica run.
    llmproxy_src: str
    #: Cores' worth of CPU other processes may use during a run before it is repeated.
    noise_limit: float = 0.10
    #: Repeats of a run that other processes disturbed.
    retries: int = 2
    #: Longest wait for a quiet machine before each run, seconds.
    quiet_wait_s: float = 30.0
    #: All waiting for quiet and repeating together stops after this many seconds.
    quiet_budget_s: float = 180.0
    #: Sequential streamed requests of the time-to-first-token measurement.
    ttft_requests: int = 2000
    ttft_warmup: int = 200
    #: Idle streams open at once for the memory measurement.
    idle_streams: int = 5000
    #: Streams that must be held at once without error.
    hold_streams: int = 10000
    #: How long the idle and hold measurements keep every stream open once all are up.
    hold_s: float = 2.0

    def ready_timeout_s(self, streams: int) -> float:
        """Longest time to get ``streams`` streams to their first event (~1,000/s here)."""
        return 20.0 + streams / 200

    @property
    def sse_max_tokens(self) -> int:
        """Long enough that no stream ends before the window does."""
        return int(SSE_TOKENS_PER_S * (self.sse_warmup_s + self.sse_window_s + SSE_MARGIN_S))


class Log:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
