"""The human-readable report: machine, settings, the Markdown table, notes."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from importlib import metadata
from typing import Any

from bench_lib import report, wrk
from bench_lib.settings import SSE_TOKENS_PER_S
from bench_lib.targets import nginx_version


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_state(src: str) -> str:
    """The commit of ``src``, marked ``+dirty`` when llmproxy/ has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", src, *args], check=False, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD")
    if not rev:
        return "not a git checkout"
    return rev + ("+dirty" if git("status", "--porcelain", "--", "llmproxy") else "")


def machine_info(src: str, git: str) -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "llmproxy": _version("llmproxy"),
        "llmproxy_src": src,
        "git": git,
        "wrk": wrk.version() if shutil.which("wrk") else "not installed",
        "nginx": nginx_version() or "not installed",
    }


def notes(doc: dict[str, Any]) -> list[str]:
    """Sanity checks on the raw numbers: errors, and whether the load side kept up."""
    raw = doc["raw"]
    st = doc["settings"]
    out: list[str] = []
    for name, why in doc["skipped"].items():
        out.append(f"{name} skipped: {why}")
    for t, by_measurement in report.failures(raw).items():
        for measurement, what in by_measurement.items():
            if measurement == "hold":
                out.append(f"**{t} {measurement}: {what}**")
            else:
                out.append(f"**{t} {measurement}: {what}: its numbers are marked (!) and invalid**")
    for measurement in ("latency", "ttft"):
        for t, runs in raw.get(measurement, {}).items():
            rec = sum(r["reconnects"] for r in runs)
            if rec:
                out.append(
                    f"{measurement} {t}: the server closed the keep-alive connection {rec} times"
                )
    for t, runs in raw["throughput"].items():
        rps = statistics.median([r["rps"] for r in runs])
        up = statistics.median([100 * r["upstream_cpu_share"] for r in runs])
        text = (
            f"wrk {t}: non-2xx {sum(int(r['status']) for r in runs)}, socket errors "
            f"connect/read/write/timeout {sum(int(r['connect']) for r in runs)}/"
            f"{sum(int(r['read']) for r in runs)}/{sum(int(r['write']) for r in runs)}/"
            f"{sum(int(r['timeout']) for r in runs)}; upstream used {up:.0f}% of core 1"
        )
        if runs and "target_cpu_share" in runs[0]:
            busy = statistics.median([100 * r["target_cpu_share"] for r in runs])
            if busy < 90:
                text += (
                    f"; proxy core only {busy:.0f}% busy at {rps:,.0f} req/s: wrk and the "
                    "upstream on core 1 set this number, the proxy could do more"
                )
        out.append(text)
    offered = st["sse_streams"] * SSE_TOKENS_PER_S
    for t, runs in raw["sse"].items():
        rate = statistics.median([r["events_per_s"] for r in runs])
        up = statistics.median([100 * r["upstream_cpu_s"] / r["window_s"] for r in runs])
        gen = statistics.median([100 * r["loadgen_cpu_s"] / r["window_s"] for r in runs])
        streaming = min(r["streams_streaming"] for r in runs)
        left = max(r["upstream_left_running"] for r in runs)
        out.append(
            f"sse {t}: {rate:,.0f} events/s = {rate / offered:.1%} of the {offered:,.0f}/s "
            f"offered; core 1: sim {up:.0f}% + load generator {gen:.0f}%; "
            f"streams up {streaming}/{st['sse_streams']}; when the clients left, the replica "
            f"stopped generating within {max(r['upstream_drain_s'] for r in runs):.2f} s"
            + (f" (**{left} streams still generating after 10 s**)" if left else "")
        )
        gaps = [r["gaps"] for r in runs if r.get("gaps", {}).get("n")]
        if gaps:
            out.append(
                f"sse gaps {t}: {statistics.median(g['n'] for g in gaps):,.0f} gaps per run, "
                f"max {max(g['max_ms'] for g in gaps):,.1f} ms, "
                f"{statistics.median(100 * g['zero_share'] for g in gaps):.1f}% "
                "of events in the same read as the one before"
            )
    out.extend(_stream_notes(raw, st))
    kept = [
        (measurement, t, r)
        for measurement in ("latency", "throughput", "ttft", "sse", "idle", "hold")
        for t, runs in raw.get(measurement, {}).items()
        for r in runs
    ]
    repeats = sum(r.get("attempt", 1) - 1 for _, _, r in kept)
    if kept:
        worst = max(kept, key=lambda k: k[2].get("foreign_cpu_share", 0.0))
        share = worst[2].get("foreign_cpu_share", 0.0)
        text = (
            f"other processes on the machine: {repeats} run(s) repeated because they used more "
            f"than {st['noise_limit']:.0%} of a core; worst kept run: {worst[0]} {worst[1]} "
            f"with {share:.0%} of a core"
        )
        out.append(f"**{text}: numbers are disturbed**" if share > st["noise_limit"] else text)
    for t, mem in raw["memory"].items():
        if "rss_end_bytes" in mem:
            out.append(
                f"{t} RSS: {mem['rss_start_bytes'] / 2**20:.1f} MiB at start, "
                f"{mem['rss_end_bytes'] / 2**20:.1f} MiB 1 s after the last streams closed"
            )
    return out


def _span(values: list[float], spec: str) -> str:
    """``"3"``, or ``"3 to 5"`` over runs that differ."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo} to {hi}"


def _stream_notes(raw: dict[str, Any], st: dict[str, Any]) -> list[str]:
    """The idle and hold measurements: how the streams came up, descriptors, cancellation."""
    out: list[str] = []
    for measurement in ("idle", "hold"):
        for t, runs in raw.get(measurement, {}).items():
            n = runs[0]["streams_requested"]
            held = [r["held"] for r in runs]
            ready = [r["ready_s"] for r in runs]
            text = (
                f"{measurement} {t}: held {_span(held, ',')} of {n:,} streams; all up (first "
                f"event) within {_span(ready, '.1f')} s"
            )
            peaks = [r["fds_peak"] for r in runs if r["fds_peak"]]
            limit = runs[0].get("fd_limit")
            if peaks:
                text += f"; proxy descriptors peak {max(peaks):,} (limit {limit or 0:,})"
            left = max(r["upstream_left_running"] for r in runs)
            text += (
                f"; when the clients left, the replica stopped within "
                f"{max(r['upstream_drain_s'] for r in runs):.2f} s"
                + (f" (**{left} streams still waiting after 10 s**)" if left else "")
            )
            out.append(text)
    for (measurement, t), r in report.fd_limited(raw).items():
        out.append(
            f"**{measurement} {t}: a process here may open {r['fd_limit']:,} files (the hard "
            "limit; raising it needs CAP_SYS_RESOURCE); a stream through a proxy takes two "
            f"(client and upstream side), so {r['streams_requested']:,} streams need "
            f"{r['fds_needed']:,}: one process cannot hold them all on this machine, and the "
            "values marked (fd) are the machine's limit, not the proxy's**"
        )
    return out


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    st = doc["settings"]
    lines = [
        "## llmproxy efficiency benchmark",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
        f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}; "
        f"{m['wrk']}; nginx {m['nginx']}; "
        f"llmproxy at git {m['git']}, run from {m['llmproxy_src']}.",
        "",
        f"Proxy pinned to core(s) {st['proxy_cores']}, one process; upstream, load generators "
        f"and driver on core(s) {st['load_cores']}. Median of {st['runs']} run(s); "
        f"c=1: {st['latency_requests']:,} sequential requests on one keep-alive connection; "
        f"c=64: wrk -t1 -c{st['wrk_connections']} -d{st['wrk_seconds']}s; "
        f"SSE: {st['sse_streams']:,} streams, {SSE_TOKENS_PER_S:g} events/s each, "
        f"{st['sse_window_s']:g} s window. Upstream of the small requests: {st['upstream']}."
        + (
            f" TTFT: {st['ttft_requests']:,} sequential streamed requests, replica without delay."
            if "ttft_requests" in st
            else ""
        )
        + (
            f" Idle: {st['idle_streams']:,} streams; hold: {st['hold_streams']:,} streams; "
            f"each open at once after its first event, {st['hold_s']:g} s, a fresh replica and "
            "target per run."
            if "hold_streams" in st
            else ""
        ),
        "",
        report.markdown_table(
            doc["summary"],
            doc["targets"],
            report.invalid_cells(doc["raw"]),
            report.limited_cells(doc["raw"]),
            settings=st,
            paired=report.paired_ratios(doc["raw"], doc["targets"]),
        ),
        "",
        "Ratios of requests/s and of CPU are the median of each run's own ratio "
        "(the targets run back to back in each run); the others are ratios of the medians.",
        "",
        "Notes:",
        *(f"- {n}" for n in notes(doc)),
        f"- wall time {doc['elapsed_s']:.0f} s",
    ]
    return "\n".join(lines)
