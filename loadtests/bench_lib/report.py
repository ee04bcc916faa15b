"""From raw runs to medians, ratios, goals, the Markdown table and a baseline comparison.

Raw results are ``{measurement: {target: [one dict per run]}}``; nothing here
measures anything, so the report can be rebuilt from a saved ``--json`` file.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
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


def _ms(v: float) -> str:
    return f"{v:.3f}"


def _added(v: float) -> str:
    return f"+{v:.3f}" if v >= 0 else f"{v:.3f}"


def _int(v: float) -> str:
    return f"{v:,.0f}"


def _one(v: float) -> str:
    return f"{v:,.1f}"


METRICS: tuple[Metric, ...] = (
    Metric("lat_p50_ms", "Latency p50, c=1, small POST (ms)", "ms", "lower", _ms),
    Metric("lat_p99_ms", "Latency p99, c=1, small POST (ms)", "ms", "lower", _ms),
    Metric("added_p50_ms", "Added p50 vs direct, c=1 (ms)", "ms", "lower", _added),
    Metric("added_p99_ms", "Added p99 vs direct, c=1 (ms)", "ms", "lower", _added),
    Metric("rps", "Requests/s, c=64, small POST (wrk)", "req/s", "higher", _int),
    Metric("cpu_us_per_req", "Proxy CPU per request at c=64 (µs)", "µs", "lower", _one),
    Metric("cpu_core_pct", "Proxy core busy at c=64 (%)", "%", "lower", _int, compared=False),
    Metric(
        "rps_per_core", "Req/s one proxy core could do (1 s ÷ CPU/request)", "req/s", "higher", _int
    ),
    Metric("sse_events_per_s", "SSE events/s, 1,000 streams x 20/s", "ev/s", "higher", _int),
    Metric("sse_cpu_us_per_event", "Proxy CPU per SSE event (µs)", "µs", "lower", _one),
    Metric("sse_rss_mib", "Proxy RSS with 1,000 streams (MiB)", "MiB", "lower", _one),
    Metric(
        "sse_rss_kib_per_stream",
        "Proxy RSS per open stream, over a fresh start (KiB)",
        "KiB",
        "lower",
        _one,
    ),
)
BY_KEY = {m.key: m for m in METRICS}


@dataclass(frozen=True, slots=True)
class Goal:
    metric: str
    op: str  # "<=" or ">="
    limit: float
    text: str

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit


GOALS: tuple[Goal, ...] = (
    Goal("added_p50_ms", "<=", 0.3, "≤ 0.3 ms"),
    Goal("rps", ">=", 5000, "≥ 5,000"),
    Goal("sse_cpu_us_per_event", "<=", 40, "≤ 40 µs"),
)
GOAL_BY_METRIC = {g.metric: g for g in GOALS}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _per_run(raw: Raw, measurement: str, target: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = raw.get(measurement, {}).get(target, [])
    return runs


def summarize(raw: Raw, targets: Sequence[str]) -> Summary:
    """Median over runs of every metric, per target."""
    out: Summary = {m.key: {} for m in METRICS}

    def put(key: str, target: str, values: list[float]) -> None:
        med = _median(values)
        if med is not None:
            out[key][target] = med

    direct_lat = _per_run(raw, "latency", DIRECT)
    for t in targets:
        lat = _per_run(raw, "latency", t)
        put("lat_p50_ms", t, [r["p50_us"] / 1000 for r in lat])
        put("lat_p99_ms", t, [r["p99_us"] / 1000 for r in lat])
        if t != DIRECT and direct_lat:
            # Differences within a run (targets measured back to back), then the median.
            for q in ("p50", "p99"):
                put(
                    f"added_{q}_ms",
                    t,
                    [
                        (r[f"{q}_us"] - d[f"{q}_us"]) / 1000
                        for r, d in zip(lat, direct_lat, strict=True)
                    ],
                )
        thr = _per_run(raw, "throughput", t)
        put("rps", t, [r["rps"] for r in thr])
        put(
            "cpu_us_per_req",
            t,
            [r["target_cpu_us_per_request"] for r in thr if "target_cpu_s" in r],
        )
        put("cpu_core_pct", t, [100 * r["target_cpu_share"] for r in thr if "target_cpu_s" in r])
        put(
            "rps_per_core",
            t,
            [1e6 / r["target_cpu_us_per_request"] for r in thr if r.get("target_cpu_s")],
        )
        sse = _per_run(raw, "sse", t)
        put("sse_events_per_s", t, [r["events_per_s"] for r in sse])
        if t != DIRECT:
            put(
                "sse_cpu_us_per_event",
                t,
                [r["target_cpu_s"] / r["events"] * 1e6 for r in sse if r["events"]],
            )
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
    return out


#: Which metrics a failed request in each measurement makes meaningless.
_MEASUREMENT_METRICS = {
    "latency": ("lat_p50_ms", "lat_p99_ms", "added_p50_ms", "added_p99_ms"),
    "throughput": ("rps", "cpu_us_per_req", "cpu_core_pct", "rps_per_core"),
    "sse": ("sse_events_per_s", "sse_cpu_us_per_event", "sse_rss_mib", "sse_rss_kib_per_stream"),
}


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
    for t, runs in raw.get("sse", {}).items():
        bad = sum(r["streams_requested"] - r["streams_streaming"] for r in runs)
        early = sum(r["closed_in_window"] for r in runs)
        if bad or early:
            out.setdefault(t, {})["sse"] = f"{bad} streams failed, {early} closed early"
    return out


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


def ratio_key(metric: str, subject: str, ref: str) -> str:
    return f"{metric}:{subject}/{ref}"


def ratios(summary: Summary, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The subject (llmproxy) divided by every other target, for every metric both have."""
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        row = summary.get(m.key, {})
        if SUBJECT not in row or not m.compared:
            continue
        for ref in targets:
            if ref == SUBJECT or ref not in row or row[ref] <= 0:
                continue
            out[ratio_key(m.key, SUBJECT, ref)] = {
                "value": row[SUBJECT] / row[ref],
                "better": m.better,
            }
    return out


def goals(summary: Summary, invalid: AbstractSet[tuple[str, str]]) -> list[dict[str, Any]]:
    out = []
    for g in GOALS:
        value = summary.get(g.metric, {}).get(SUBJECT)
        ok = None if value is None or (g.metric, SUBJECT) in invalid else g.met(value)
        out.append({"metric": g.metric, "goal": f"{g.op} {g.limit}", "value": value, "pass": ok})
    return out


def markdown_table(
    summary: Summary, targets: Sequence[str], invalid: AbstractSet[tuple[str, str]] = frozenset()
) -> str:
    """Invalid values (from runs with failed requests) carry a ``(!)`` and no verdict."""
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
        cells = [m.label]
        cells += [
            (m.fmt(row[t]) + (" (!)" if (m.key, t) in invalid else "")) if t in row else "—"
            for t in targets
        ]
        for r in refs:
            if SUBJECT in row and r in row and row[r] > 0:
                cells.append(f"{row[SUBJECT] / row[r]:.2f}x")
            else:
                cells.append("—")
        g = GOAL_BY_METRIC.get(m.key)
        if g is None:
            cells += ["", ""]
        elif (m.key, SUBJECT) in invalid:
            cells += [g.text, "**INVALID**"]
        elif SUBJECT in row:
            cells += [g.text, "**PASS**" if g.met(row[SUBJECT]) else "**MISS**"]
        else:
            cells += [g.text, "n/a"]
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
    rows: list[tuple[str, str, float, float, str]] = []
    base_r: dict[str, dict[str, Any]] = baseline.get("ratios", {})
    for key, cur in current.get("ratios", {}).items():
        if key in base_r:
            rows.append(("ratio", key, base_r[key]["value"], cur["value"], cur["better"]))
    base_s: Summary = baseline.get("summary", {})
    for m in METRICS:
        if not m.compared:
            continue
        b = base_s.get(m.key, {}).get(SUBJECT)
        c = current.get("summary", {}).get(m.key, {}).get(SUBJECT)
        if b is not None and c is not None:
            rows.append(("absolute", f"{m.key}:{SUBJECT}", b, c, m.better))
    worse = 0
    lines = [
        f"| kind | key | baseline | now | change | verdict (margin {margin:.0%}) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for kind, key, b, c, better in rows:
        change = (c - b) / abs(b) if b else 0.0
        # Added latency can be near zero or negative: judge it by its own margin of 0.05 ms.
        if key.startswith("added_") and kind == "absolute":
            worsened = c - b > max(margin * abs(b), 0.05)
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
