"""From raw runs to medians, ratios, goals, the Markdown table and a baseline comparison.

Raw results are ``{measurement: {target: [one dict per run]}}``; nothing here
measures anything, so the report can be rebuilt from a saved ``--json`` file.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import partial
from typing import Any

Raw = dict[str, Any]
Summary = dict[str, dict[str, float]]

SUBJECT = "llmproxy"
DIRECT = "direct"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def latency_stats(samples_us: Sequence[float]) -> dict[str, float]:
    s = sorted(samples_us)
    return {
        "n": len(s),
        "min_us": s[0],
        "p50_us": percentile(s, 50),
        "p90_us": percentile(s, 90),
        "p99_us": percentile(s, 99),
        "p999_us": percentile(s, 99.9),
        "max_us": s[-1],
        "mean_us": statistics.fmean(s),
    }


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    #: "lower" or "higher": which way is better (for ratios and comparisons).
    better: str
    #: Formats one value for the table.
    fmt: Callable[[float], str]
    #: Whether --compare judges it (a busier core is not worse in itself).
    compared: bool = True
    #: Smallest change of the absolute value (in ``unit``) --compare calls worse, for
    #: values near zero ("added" ones) where a relative margin means nothing; their
    #: ratios are shown only when both values are above it.
    floor: float = 0.0

    def ratio(self, value: float | None, ref: float | None) -> float | None:
        """``value ÷ ref``, or None where the quotient means nothing (noise, zero)."""
        if value is None or ref is None or ref <= self.floor or ref <= 0:
            return None
        if self.floor and value <= self.floor:
            return None
        return value / ref

    def title(self, settings: dict[str, Any] | None = None) -> str:
        """The label with the run's sizes filled in (``{sse_streams:,}``...)."""
        return self.label.format_map({**LABEL_DEFAULTS, **(settings or {})})


#: Sizes in labels, for files saved before a setting existed.
LABEL_DEFAULTS: dict[str, Any] = {"sse_streams": 1000, "idle_streams": 5000, "hold_streams": 10000}


def _ms(v: float) -> str:
    return f"{v:.3f}"


def _added(v: float) -> str:
    return f"+{v:.3f}" if v >= 0 else f"{v:.3f}"


def _int(v: float) -> str:
    return f"{v:,.0f}"


def _one(v: float) -> str:
    return f"{v:,.1f}"


def _two(v: float) -> str:
    return f"{v:,.2f}"


def _added2(v: float) -> str:
    return f"+{v:.2f}" if v >= 0 else f"{v:.2f}"


METRICS: tuple[Metric, ...] = (
    Metric("lat_p50_ms", "Latency p50, c=1, small POST (ms)", "ms", "lower", _ms),
    Metric("lat_p99_ms", "Latency p99, c=1, small POST (ms)", "ms", "lower", _ms),
    Metric("lat_p999_ms", "Latency p99.9, c=1, small POST (ms)", "ms", "lower", _ms),
    Metric("added_p50_ms", "Added p50 vs direct, c=1 (ms)", "ms", "lower", _added, floor=0.05),
    Metric("added_p99_ms", "Added p99 vs direct, c=1 (ms)", "ms", "lower", _added, floor=0.05),
    Metric("added_p999_ms", "Added p99.9 vs direct, c=1 (ms)", "ms", "lower", _added, floor=0.05),
    Metric("ttft_p50_ms", "TTFT p50, c=1, small streamed POST (ms)", "ms", "lower", _ms),
    Metric("ttft_p99_ms", "TTFT p99, c=1, small streamed POST (ms)", "ms", "lower", _ms),
    Metric("ttft_p999_ms", "TTFT p99.9, c=1, small streamed POST (ms)", "ms", "lower", _ms),
    Metric(
        "ttft_added_p50_ms", "Added TTFT p50 vs direct, c=1 (ms)", "ms", "lower", _added, floor=0.05
    ),
    Metric(
        "ttft_added_p99_ms", "Added TTFT p99 vs direct, c=1 (ms)", "ms", "lower", _added, floor=0.05
    ),
    Metric(
        "ttft_added_p999_ms",
        "Added TTFT p99.9 vs direct, c=1 (ms)",
        "ms",
        "lower",
        _added,
        floor=0.05,
    ),
    Metric("rps", "Requests/s, c=64, small POST (wrk)", "req/s", "higher", _int),
    Metric("cpu_us_per_req", "Proxy CPU per request at c=64 (µs)", "µs", "lower", _one),
    Metric("cpu_core_pct", "Proxy core busy at c=64 (%)", "%", "lower", _int, compared=False),
    Metric(
        "rps_per_core", "Req/s one proxy core could do (1 s ÷ CPU/request)", "req/s", "higher", _int
    ),
    Metric(
        "sse_events_per_s", "SSE events/s, {sse_streams:,} streams x 20/s", "ev/s", "higher", _int
    ),
    Metric("sse_cpu_us_per_event", "Proxy CPU per SSE event (µs)", "µs", "lower", _one),
    Metric("sse_gap_p50_ms", "SSE gap between events p50 (ms; sent every 50)", "ms", "lower", _two),
    Metric("sse_gap_p99_ms", "SSE gap between events p99 (ms)", "ms", "lower", _two),
    Metric("sse_gap_p999_ms", "SSE gap between events p99.9 (ms)", "ms", "lower", _two),
    Metric(
        "sse_gap_added_p99_ms", "Added SSE gap p99 vs direct (ms)", "ms", "lower", _added2, floor=1
    ),
    Metric(
        "sse_gap_added_p999_ms",
        "Added SSE gap p99.9 vs direct (ms)",
        "ms",
        "lower",
        _added2,
        floor=1,
    ),
    Metric(
        "sse_core_wait_p99_ms",
        "Proxy's core, idle: wait before it runs new work, p99 of time (ms)",
        "ms",
        "lower",
        _two,
        compared=False,
    ),
    Metric(
        "sse_core_wait_p999_ms",
        "Proxy's core, idle: wait before it runs new work, p99.9 of time (ms)",
        "ms",
        "lower",
        _two,
        compared=False,
    ),
    Metric(
        "sse_core_wait_max_ms",
        "Proxy's core, idle: longest wait (ms)",
        "ms",
        "lower",
        _two,
        compared=False,
    ),
    Metric("sse_rss_mib", "Proxy RSS with {sse_streams:,} streams (MiB)", "MiB", "lower", _one),
    Metric(
        "sse_rss_kib_per_stream",
        "Proxy RSS per open stream, over a fresh start (KiB)",
        "KiB",
        "lower",
        _one,
    ),
    Metric(
        "idle_rss_kib_per_1k",
        "Proxy RSS per 1,000 idle streams, {idle_streams:,} open (KiB)",
        "KiB",
        "lower",
        _int,
    ),
    Metric("idle_rss_kib_per_stream", "Proxy RSS per idle stream (KiB)", "KiB", "lower", _one),
    Metric(
        "idle_rss_peak_mib",
        "Proxy peak RSS, {idle_streams:,} idle streams (MiB)",
        "MiB",
        "lower",
        _one,
    ),
    Metric(
        "hold_held",
        "Streams held at once, of {hold_streams:,} (worst run)",
        "streams",
        "higher",
        _int,
    ),
    Metric(
        "hold_errors",
        "Streams not held, of {hold_streams:,} (worst run)",
        "streams",
        "lower",
        _int,
    ),
    Metric(
        "hold_ready_s",
        "Seconds until all {hold_streams:,} had a first event",
        "s",
        "lower",
        _one,
        compared=False,
    ),
    Metric(
        "hold_rss_peak_mib",
        "Proxy peak RSS, {hold_streams:,} streams (MiB)",
        "MiB",
        "lower",
        _one,
    ),
    Metric(
        "workers_rps_1",
        "Requests/s, 1 worker, nothing pinned (wrk -t2 -c64)",
        "req/s",
        "higher",
        _int,
    ),
    Metric("workers_rps_2", "Requests/s, 2 workers, nothing pinned", "req/s", "higher", _int),
    Metric("workers_scaling", "2 workers ÷ 1 worker, requests/s", "x", "higher", _two),
    Metric("workers_cpu_us_1", "Gateway CPU per request, 1 worker (µs)", "µs", "lower", _one),
    Metric(
        "workers_cpu_us_2",
        "Gateway CPU per request, 2 workers and their supervisor (µs)",
        "µs",
        "lower",
        _one,
    ),
    Metric(
        "workers_cores_2",
        "Cores the 2 workers used (of the machine's)",
        "cores",
        "higher",
        _two,
        compared=False,
    ),
)
BY_KEY = {m.key: m for m in METRICS}


@dataclass(frozen=True, slots=True)
class Goal:
    """A target from an issue: on llmproxy's value, or on its ratio to ``ref``."""

    metric: str
    op: str  # "<=" or ">="
    limit: float
    text: str
    #: The issue that sets it.
    issue: int
    #: None: the goal is on the value; a target name: on llmproxy ÷ that target.
    ref: str | None = None

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def subject_value(
        self, row: dict[str, float], metric: Metric, paired: Paired | None = None
    ) -> float | None:
        """What the goal is checked on: llmproxy's value, or its ratio to ``ref``."""
        if self.ref is None:
            return row.get(SUBJECT)
        return ratio_of(metric, row, self.ref, paired)


#: Issue #2's foundation targets and issue #6's, one gateway process on one core.
GOALS: tuple[Goal, ...] = (
    Goal("added_p50_ms", "<=", 0.3, "≤ 0.3 ms (#2)", 2),
    Goal("added_p50_ms", "<=", 0.25, "≤ 0.25 ms (#6)", 6),
    Goal("added_p99_ms", "<=", 0.6, "≤ 0.6 ms (#6)", 6),
    Goal("rps", ">=", 5000, "≥ 5,000 (#2)", 2),
    Goal("rps", ">=", 0.2, "≥ 0.2x nginx (#6)", 6, ref="nginx"),
    Goal("sse_cpu_us_per_event", "<=", 40, "≤ 40 µs (#2)", 2),
    Goal("sse_cpu_us_per_event", "<=", 1.2, "≤ 1.2x nginx (#6)", 6, ref="nginx"),
    Goal("sse_gap_added_p99_ms", "<=", 1.0, "≤ 1 ms (#6)", 6),
    Goal("sse_gap_added_p999_ms", "<=", 5.0, "≤ 5 ms (#6)", 6),
    Goal("idle_rss_kib_per_stream", "<=", 16, "≤ 16 KiB (#6)", 6),
    Goal("hold_errors", "<=", 0, "0 errors (#6)", 6),
)
GOALS_BY_METRIC: dict[str, list[Goal]] = {}
for _g in GOALS:
    GOALS_BY_METRIC.setdefault(_g.metric, []).append(_g)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _per_run(raw: Raw, measurement: str, target: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = raw.get(measurement, {}).get(target, [])
    return runs


def summarize(raw: Raw, targets: Sequence[str]) -> Summary:
    """Median over runs of every metric, per target (the hold counts: the worst run)."""
    out: Summary = {m.key: {} for m in METRICS}

    def put(key: str, target: str, values: list[float]) -> None:
        med = _median(values)
        if med is not None:
            out[key][target] = med

    def added(
        key: str, target: str, runs: list[dict[str, Any]], value: Callable[[Raw], float | None]
    ) -> None:
        """Target minus direct within each run (measured back to back), then the median."""
        direct = _per_run(raw, _MEASUREMENT_OF[key], DIRECT)
        if target == DIRECT or not direct:
            return
        diffs = []
        for r, d in zip(runs, direct, strict=True):
            a, b = value(r), value(d)
            if a is not None and b is not None:
                diffs.append(a - b)
        put(key, target, diffs)

    for t in targets:
        lat = _per_run(raw, "latency", t)
        ttft = _per_run(raw, "ttft", t)
        for q in ("p50", "p99", "p999"):
            put(f"lat_{q}_ms", t, [r[f"{q}_us"] / 1000 for r in lat])
            put(f"ttft_{q}_ms", t, [r[f"{q}_us"] / 1000 for r in ttft])
            added(f"added_{q}_ms", t, lat, partial(_us_as_ms, f"{q}_us"))
            added(f"ttft_added_{q}_ms", t, ttft, partial(_us_as_ms, f"{q}_us"))
        thr = _per_run(raw, "throughput", t)
        put("rps", t, [r["rps"] for r in thr])
        put(
            "cpu_us_per_req",
            t,
            [v for r in thr if (v := _cpu_per_request(r)) is not None],
        )
        put("cpu_core_pct", t, [100 * r["target_cpu_share"] for r in thr if "target_cpu_s" in r])
        put(
            "rps_per_core",
            t,
            [v for r in thr if (v := _per_core(r)) is not None],
        )
        sse = _per_run(raw, "sse", t)
        put("sse_events_per_s", t, [r["events_per_s"] for r in sse])
        for q in ("p50", "p99", "p999"):
            put(f"sse_gap_{q}_ms", t, [g for r in sse if (g := _gap(q, r)) is not None])
        for q in ("p99", "p999"):
            added(f"sse_gap_added_{q}_ms", t, sse, partial(_gap, q))
            # The floor under those gaps: how long the proxy's core, idle,
            # keeps new work waiting (a sleeper there, during the direct run).
            put(f"sse_core_wait_{q}_ms", t, _probed(sse, f"wait_{q}_ms"))
        put("sse_core_wait_max_ms", t, _probed(sse, "max_ms"))
        idle = _per_run(raw, "idle", t)
        hold = _per_run(raw, "hold", t)
        if hold:
            # Whether every stream was held: the worst run counts, not the median.
            out["hold_held"][t] = min(r["held"] for r in hold)
            out["hold_errors"][t] = max(r["errors"] for r in hold)
        put("hold_ready_s", t, [r["ready_s"] for r in hold if r["all_ready"]])
        if t == DIRECT:
            continue
        put("sse_cpu_us_per_event", t, [v for r in sse if (v := _cpu_per_event(r)) is not None])
        put("sse_rss_mib", t, [r["target_rss_bytes"] / 2**20 for r in sse])
        # Against the RSS of the freshly started proxy, not the RSS just before
        # the run: memory a run leaves behind (it rarely goes back to the OS)
        # would otherwise make later runs look free.
        fresh = raw.get("memory", {}).get(t, {}).get("rss_start_bytes")
        if fresh is not None:
            put(
                "sse_rss_kib_per_stream",
                t,
                [
                    (r["target_rss_bytes"] - fresh) / r["streams_streaming"] / 1024
                    for r in sse
                    if r["streams_streaming"]
                ],
            )
        # Each idle run has a freshly started proxy: "before" is its RSS just
        # before the streams opened.
        grown = [
            (r["rss_peak_bytes"] - r["rss_before_bytes"], r["streams_requested"]) for r in idle
        ]
        put("idle_rss_kib_per_1k", t, [b / 1024 / (n / 1000) for b, n in grown])
        put("idle_rss_kib_per_stream", t, [b / 1024 / n for b, n in grown])
        put("idle_rss_peak_mib", t, [r["rss_peak_bytes"] / 2**20 for r in idle])
        put("hold_rss_peak_mib", t, [r["rss_peak_bytes"] / 2**20 for r in hold])
        # Both worker counts are measured back to back in each run: the ratio
        # is taken within a run, then the median.
        by = [r["by_workers"] for r in _per_run(raw, "workers", t)]
        put("workers_rps_1", t, [b["1"]["rps"] for b in by if "1" in b])
        put("workers_rps_2", t, [b["2"]["rps"] for b in by if "2" in b])
        put("workers_scaling", t, [b["2"]["rps"] / b["1"]["rps"] for b in by if _both(b)])
        for n in ("1", "2"):
            cpu = [v for b in by if (v := _cpu_per_request(b.get(n, {}))) is not None]
            put(f"workers_cpu_us_{n}", t, cpu)
        put("workers_cores_2", t, [c for b in by if (c := b.get("2", {}).get("target_cpu_share"))])
    return out


def _us_as_ms(key: str, run: Raw) -> float | None:
    value: float = run[key] / 1000
    return value


def _cpu_per_event(run: Raw) -> float | None:
    if not run.get("events") or "target_cpu_s" not in run:
        return None
    value: float = run["target_cpu_s"] / run["events"] * 1e6
    return value


def _cpu_per_request(run: Raw) -> float | None:
    """The target's CPU per request in a wrk run (None: not read, as for direct)."""
    value: float | None = run.get("target_cpu_us_per_request") if "target_cpu_s" in run else None
    return value


def _per_core(run: Raw) -> float | None:
    cpu = _cpu_per_request(run)
    return 1e6 / cpu if cpu else None


def _both(by_workers: Raw) -> bool:
    return "1" in by_workers and "2" in by_workers and by_workers["1"]["rps"] > 0


def _probed(runs: list[Raw], key: str) -> list[float]:
    """A figure of the proxy's idle core from each SSE run that probed it (direct's)."""
    return [w[key] for r in runs if key in (w := r.get("core_wake", {}))]


def _gap(q: str, run: Raw) -> float | None:
    """Percentile ``q`` ("p99") of an SSE run's inter-event gaps, ms (None: not recorded)."""
    gaps = run.get("gaps") or {}
    value: float | None = gaps.get(f"{q}_ms") if gaps.get("n") else None
    return value


#: Which metrics a failed request in each measurement makes meaningless. Streams
#: not held are what the hold measurement counts: there, failures invalidate only
#: what needs every stream up.
_MEASUREMENT_METRICS = {
    "latency": (
        "lat_p50_ms",
        "lat_p99_ms",
        "lat_p999_ms",
        "added_p50_ms",
        "added_p99_ms",
        "added_p999_ms",
    ),
    "throughput": ("rps", "cpu_us_per_req", "cpu_core_pct", "rps_per_core"),
    "ttft": (
        "ttft_p50_ms",
        "ttft_p99_ms",
        "ttft_p999_ms",
        "ttft_added_p50_ms",
        "ttft_added_p99_ms",
        "ttft_added_p999_ms",
    ),
    "sse": (
        "sse_events_per_s",
        "sse_cpu_us_per_event",
        "sse_gap_p50_ms",
        "sse_gap_p99_ms",
        "sse_gap_p999_ms",
        "sse_gap_added_p99_ms",
        "sse_gap_added_p999_ms",
        "sse_core_wait_p99_ms",
        "sse_core_wait_p999_ms",
        "sse_core_wait_max_ms",
        "sse_rss_mib",
        "sse_rss_kib_per_stream",
    ),
    "idle": ("idle_rss_kib_per_1k", "idle_rss_kib_per_stream", "idle_rss_peak_mib"),
    "hold": ("hold_ready_s", "hold_rss_peak_mib"),
    "workers": (
        "workers_rps_1",
        "workers_rps_2",
        "workers_scaling",
        "workers_cpu_us_1",
        "workers_cpu_us_2",
        "workers_cores_2",
    ),
}
_MEASUREMENT_OF = {k: m for m, keys in _MEASUREMENT_METRICS.items() for k in keys}
#: The hold measurement's result, whatever failed.
_HOLD_COUNTS = ("hold_held", "hold_errors")


def failures(raw: Raw) -> dict[str, dict[str, str]]:
    """``{target: {measurement: what went wrong}}`` for runs with failed requests.

    A proxy that answers errors fast is not fast: numbers from such runs are
    marked invalid rather than compared with goals.
    """
    out: dict[str, dict[str, str]] = {}
    for t, runs in raw.get("latency", {}).items():
        errs = sum(r["errors"] for r in runs)
        if errs:
            out.setdefault(t, {})["latency"] = f"{errs} non-200 responses"
    for t, runs in raw.get("throughput", {}).items():
        non2xx = sum(int(r["status"]) for r in runs)
        sock = sum(int(r["socket_errors"]) for r in runs)
        if non2xx or sock:
            out.setdefault(t, {})["throughput"] = f"{non2xx} non-2xx, {sock} socket errors"
    for t, runs in raw.get("ttft", {}).items():
        errs = sum(r["errors"] for r in runs)
        if errs:
            out.setdefault(t, {})["ttft"] = f"{errs} responses not 200 or without an SSE event"
    for t, runs in raw.get("sse", {}).items():
        bad = sum(r["streams_requested"] - r["streams_streaming"] for r in runs)
        early = sum(r["closed_in_window"] for r in runs)
        if bad or early:
            out.setdefault(t, {})["sse"] = f"{bad} streams failed, {early} closed early"
    for t, runs in raw.get("workers", {}).items():
        counts = [r for run in runs for r in run["by_workers"].values()]
        non2xx = sum(int(r["status"]) for r in counts)
        sock = sum(int(r["socket_errors"]) for r in counts)
        if non2xx or sock:
            out.setdefault(t, {})["workers"] = f"{non2xx} non-2xx, {sock} socket errors"
    for measurement in ("idle", "hold"):
        for t, runs in raw.get(measurement, {}).items():
            bad = [r for r in runs if r["errors"]]
            if bad:
                worst = max(bad, key=lambda r: r["errors"])
                out.setdefault(t, {})[measurement] = (
                    f"{len(bad)} of {len(runs)} run(s) did not hold every stream; "
                    f"worst: {not_held(worst)}"
                )
    return out


def not_held(run: Raw) -> str:
    """What became of the streams of an idle or hold run that were not held."""
    kinds = (
        ("connect errors", run["connect_errors"]),
        ("not opened before the deadline", run["not_opened"]),
        ("answered other than 200 or closed before a head", run["failed"]),
        ("no first event", run["no_first_event"]),
        ("closed after their first event", run["dropped"]),
    )
    statuses = {k: v for k, v in run["statuses"].items() if k != "200"}
    detail = ", ".join(f"{what} {n:,}" for what, n in kinds if n)
    return (
        f"{run['errors']:,} of {run['streams_requested']:,} not held ({detail})"
        + (f", statuses {statuses}" if statuses else "")
        + ("; progress stalled" if run.get("stalled") else "")
    )


def fd_limited(raw: Raw) -> dict[tuple[str, str], Raw]:
    """``{(measurement, target): worst run}`` where idle or hold runs failed while needing
    more descriptors than one process may have on this machine.
    """
    out: dict[tuple[str, str], Raw] = {}
    for measurement in ("idle", "hold"):
        for t, runs in raw.get(measurement, {}).items():
            hit = [
                r
                for r in runs
                if r["errors"] and r.get("fd_limit") is not None and r["fds_needed"] > r["fd_limit"]
            ]
            if hit:
                out[measurement, t] = max(hit, key=lambda r: r["errors"])
    return out


def limited_cells(raw: Raw) -> set[tuple[str, str]]:
    """``(metric, target)`` pairs that the machine's open-files limit decided."""
    cells: set[tuple[str, str]] = set()
    for measurement, t in fd_limited(raw):
        keys = _MEASUREMENT_METRICS[measurement] + (_HOLD_COUNTS if measurement == "hold" else ())
        cells.update((k, t) for k in keys)
    return cells


def invalid_cells(raw: Raw) -> set[tuple[str, str]]:
    """``(metric, target)`` pairs computed from runs with failures."""
    cells = set()
    for t, by_measurement in failures(raw).items():
        for measurement in by_measurement:
            for key in _MEASUREMENT_METRICS[measurement]:
                cells.add((key, t))
                if t == DIRECT:  # every "added" and ratio depends on direct
                    cells.update((key, other) for other in raw.get(measurement, {}))
    return cells


#: ``{metric: {ref: llmproxy ÷ ref}}``, each the median of the runs' own ratios.
Paired = dict[str, dict[str, float]]


#: Metrics whose ratio is taken run by run: each run measures every target back
#: to back (rotating who goes first), so whatever the host did to that minute
#: (these VMs' speed drifts by a fifth within an hour) is in both values and
#: cancels; a ratio of medians would mix one target's good minute with the
#: other's bad one. (measurement, the value of one run)
_PAIRED: dict[str, tuple[str, Callable[[Raw], float | None]]] = {
    "rps": ("throughput", lambda r: r.get("rps")),
    "cpu_us_per_req": ("throughput", _cpu_per_request),
    "rps_per_core": ("throughput", _per_core),
    "sse_cpu_us_per_event": ("sse", _cpu_per_event),
}


def paired_ratios(raw: Raw, targets: Sequence[str]) -> Paired:
    """llmproxy ÷ each other target within each run, then the median, for :data:`_PAIRED`."""
    out: Paired = {}
    for key, (measurement, value) in _PAIRED.items():
        m = BY_KEY[key]
        mine = _per_run(raw, measurement, SUBJECT)
        for ref in targets:
            theirs = _per_run(raw, measurement, ref)
            if ref == SUBJECT or not mine or len(mine) != len(theirs):
                continue
            each = [m.ratio(value(a), value(b)) for a, b in zip(mine, theirs, strict=True)]
            med = _median([q for q in each if q is not None])
            if med is not None:
                out.setdefault(key, {})[ref] = med
    return out


def ratio_of(m: Metric, row: dict[str, float], ref: str, paired: Paired | None) -> float | None:
    """llmproxy ÷ ``ref`` for the table, the goals and --compare: paired where it can be."""
    q = (paired or {}).get(m.key, {}).get(ref)
    return q if q is not None else m.ratio(row.get(SUBJECT), row.get(ref))


def ratio_key(metric: str, subject: str, ref: str) -> str:
    return f"{metric}:{subject}/{ref}"


def ratios(
    summary: Summary, targets: Sequence[str], paired: Paired | None = None
) -> dict[str, dict[str, Any]]:
    """The subject (llmproxy) divided by every other target, for every metric both have."""
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        row = summary.get(m.key, {})
        if SUBJECT not in row or not m.compared:
            continue
        for ref in targets:
            q = None if ref == SUBJECT else ratio_of(m, row, ref, paired)
            if q is not None:
                out[ratio_key(m.key, SUBJECT, ref)] = {"value": q, "better": m.better}
    return out


def goals(
    summary: Summary,
    invalid: AbstractSet[tuple[str, str]],
    limited: AbstractSet[tuple[str, str]] = frozenset(),
    paired: Paired | None = None,
) -> list[dict[str, Any]]:
    out = []
    for g in GOALS:
        value = g.subject_value(summary.get(g.metric, {}), BY_KEY[g.metric], paired)
        ok = None if value is None or (g.metric, SUBJECT) in invalid else g.met(value)
        item = {
            "metric": g.metric,
            "issue": g.issue,
            "goal": f"{g.op} {g.limit}" + (f" x {g.ref}" if g.ref else ""),
            "value": value,
            "pass": ok,
        }
        if (g.metric, SUBJECT) in limited:
            item["fd_limited"] = True
        out.append(item)
    return out


def markdown_table(
    summary: Summary,
    targets: Sequence[str],
    invalid: AbstractSet[tuple[str, str]] = frozenset(),
    limited: AbstractSet[tuple[str, str]] = frozenset(),
    *,
    settings: dict[str, Any] | None = None,
    paired: Paired | None = None,
) -> str:
    """Invalid values (from runs with failed requests) carry a ``(!)`` and no verdict;
    values the machine's open-files limit decided carry ``(fd)``.
    """
    refs = [t for t in targets if t != SUBJECT]
    head = ["Measurement (median of runs)", *targets]
    head += [f"{SUBJECT} ÷ {r}" for r in refs]
    head += ["Goal", "Result"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for m in METRICS:
        row = summary.get(m.key, {})
        if not row:
            continue
        cells = [m.title(settings)]
        cells += [
            m.fmt(row[t])
            + (" (fd)" if (m.key, t) in limited else " (!)" if (m.key, t) in invalid else "")
            if t in row
            else "—"
            for t in targets
        ]
        for r in refs:
            q = ratio_of(m, row, r, paired)
            cells.append("—" if q is None else f"{q:.2f}x")
        texts, verdicts = [], []
        for g in GOALS_BY_METRIC.get(m.key, ()):
            texts.append(g.text)
            value = g.subject_value(row, m, paired)
            if (m.key, SUBJECT) in invalid:
                verdicts.append("**INVALID**")
            elif value is None:
                verdicts.append("n/a")
            elif g.met(value):
                verdicts.append("**PASS**")
            else:
                limit = " (fd limit)" if (m.key, SUBJECT) in limited else ""
                verdicts.append(f"**MISS**{limit}")
        cells += ["; ".join(texts), " / ".join(verdicts)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst_foreign_share(doc: Raw) -> float:
    """The most CPU (in cores) other processes used during any kept run."""
    raw = doc.get("raw", {})
    shares = [
        r.get("foreign_cpu_share", 0.0)
        for m in _MEASUREMENT_METRICS
        for runs in raw.get(m, {}).values()
        for r in runs
    ]
    return max(shares, default=0.0)


def compare(current: Raw, baseline: Raw, margin: float) -> tuple[str, int]:
    """A Markdown table of ratios (and the subject's absolute medians) against a
    baseline; returns it and how many worsened by more than ``margin``.
    """
    rows: list[tuple[str, str, float, float, str, float]] = []
    base_r: dict[str, dict[str, Any]] = baseline.get("ratios", {})
    for key, cur in current.get("ratios", {}).items():
        if key in base_r:
            rows.append(("ratio", key, base_r[key]["value"], cur["value"], cur["better"], 0.0))
    base_s: Summary = baseline.get("summary", {})
    for m in METRICS:
        if not m.compared:
            continue
        b = base_s.get(m.key, {}).get(SUBJECT)
        c = current.get("summary", {}).get(m.key, {}).get(SUBJECT)
        if b is not None and c is not None:
            rows.append(("absolute", f"{m.key}:{SUBJECT}", b, c, m.better, m.floor))
    worse = 0
    lines = [
        f"| kind | key | baseline | now | change | verdict (margin {margin:.0%}) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for kind, key, b, c, better, floor in rows:
        change = (c - b) / abs(b) if b else 0.0
        if kind == "ratio" and BY_KEY[key.partition(":")[0]].floor:
            # Two near-zero values: +0.03 ms turns 1.0x into 1.3x. Their
            # absolute row is judged, against the metric's floor.
            lines.append(f"| {kind} | {key} | {b:.4g} | {c:.4g} | {change:+.1%} | (absolute row) |")
            continue
        # Added latency can be near zero or negative: judged by its own floor (0.05 ms...).
        if floor:
            worse_by = c - b if better == "lower" else b - c
            worsened = worse_by > max(margin * abs(b), floor)
        elif better == "lower":
            worsened = c > b * (1 + margin) if b >= 0 else c > b + margin * abs(b)
        else:
            worsened = c < b * (1 - margin)
        improved = (c < b) if better == "lower" else (c > b)
        verdict = "**WORSE**" if worsened else ("better" if improved else "same")
        worse += worsened
        lines.append(f"| {kind} | {key} | {b:.4g} | {c:.4g} | {change:+.1%} | {verdict} |")
    if not rows:
        lines.append("| — | nothing in common with the baseline | | | | |")
    return "\n".join(lines), worse
