#!/usr/bin/env python3
"""Efficiency benchmark: direct vs llmproxy (vs nginx), side by side, in one run.

    python loadtests/bench.py [--quick] [--runs N] [--json OUT] [--compare BASELINE.json]

Measures, for every target (``direct`` to the upstream, ``llmproxy``, and
``nginx`` when its binary is installed):

1. latency p50/p99 at concurrency 1: sequential small non-streamed POSTs
   (chat completion, max_tokens 1) over one keep-alive connection, and the
   latency each proxy adds to the direct path;
2. requests/s at concurrency 64: wrk, 1 thread, 64 connections, same POST;
   with the proxy's CPU per request;
3. CPU per relayed SSE event: 1,000 concurrent streams from a simulated
   replica at 20 tokens/s (50 ms between events); the proxy's CPU time over a
   window divided by the events the clients received in it; and its RSS.

The proxy under test runs on core 0 (one process); the upstream, the load
generators and this driver on core 1. Each measurement runs ``--runs`` times
(targets interleaved, their order rotated each run) and the median is
reported. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from bench_lib import report, wrk
from bench_lib.procs import (
    BenchError,
    Child,
    ForeignCpu,
    Processes,
    cores_of,
    cpu_seconds,
    rss_bytes,
    wait_quiet,
)
from bench_lib.targets import (
    NAMES,
    REPO,
    Endpoint,
    Running,
    TargetKind,
    nginx_version,
    target_kinds,
)

HERE = Path(__file__).resolve().parent
MODEL = "sim-model"
SMALL_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
)
PATH = "/v1/chat/completions"
SSE_TOKENS_PER_S = 20.0
#: Seconds a stream lasts beyond warm-up and window: covers opening 1,000 streams.
#: (The replica builds every token up front, ~2 µs each: keep streams no longer.)
SSE_MARGIN_S = 25.0
UPSTREAM_READY = r"listening on http://([\d.]+):(\d+)"
MEASUREMENTS = ("latency", "throughput", "sse")


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

    @property
    def sse_max_tokens(self) -> int:
        """Long enough that no stream ends before the window does."""
        return int(SSE_TOKENS_PER_S * (self.sse_warmup_s + self.sse_window_s + SSE_MARGIN_S))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loadtests/bench.py", description=__doc__.split("\n", 1)[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (well under a minute)")
    p.add_argument("--runs", type=int, help="runs of each measurement (default 3; --quick 1)")
    p.add_argument("--json", metavar="OUT", type=Path, help="write all raw numbers here")
    p.add_argument(
        "--compare",
        metavar="BASELINE",
        type=Path,
        help="report ratios that worsened versus a saved --json file (exit status stays 0)",
    )
    p.add_argument(
        "--render",
        metavar="SAVED",
        type=Path,
        help="measure nothing: print the report of a file written by --json",
    )
    p.add_argument("--margin", type=float, default=0.10, help="--compare margin (default 0.10)")
    p.add_argument(
        "--targets",
        default=",".join(NAMES),
        help="comma-separated targets (default: %(default)s; unavailable ones are skipped)",
    )
    p.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help="comma-separated measurements to run (default: %(default)s)",
    )
    p.add_argument(
        "--upstream",
        choices=("canned", "sim"),
        default="canned",
        help="upstream of measurements 1-2: a canned fast server (default) or the simulated "
        "replica (ttft 0); measurement 3 always uses the simulated replica",
    )
    p.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams")
    p.add_argument(
        "--llmproxy-src",
        type=Path,
        default=REPO,
        help="checkout whose llmproxy package is measured (default: this one, %(default)s)",
    )
    p.add_argument(
        "--noise-limit",
        type=float,
        default=0.10,
        help="a run during which other processes used more than this many cores is "
        "repeated (default %(default)s; the machine may be shared)",
    )
    p.add_argument("--retries", type=int, help="repeats of a disturbed run (default 2; --quick 0)")
    p.add_argument(
        "--commit",
        metavar="REV",
        help="measure llmproxy as committed at REV (exported with git archive into the work "
        "dir), not the working tree: reproducible while the tree is being edited",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    return p.parse_args(argv)


def settings_from(ns: argparse.Namespace, ncpu: int, src: Path) -> Settings:
    quick = ns.quick
    runs = ns.runs if ns.runs is not None else (1 if quick else 3)
    if runs < 1:
        raise SystemExit("--runs must be >= 1")
    only = tuple(m for m in ns.only.split(",") if m)
    bad = set(only) - set(MEASUREMENTS)
    if bad:
        raise SystemExit(f"--only: unknown measurement(s) {sorted(bad)}; known: {MEASUREMENTS}")
    pinned = ncpu >= 2
    return Settings(
        runs=runs,
        latency_requests=500 if quick else 3000,
        latency_warmup=100 if quick else 300,
        wrk_seconds=3 if quick else 10,
        wrk_warmup_seconds=1,
        wrk_connections=64,
        sse_streams=ns.streams,
        sse_window_s=4.0 if quick else 10.0,
        sse_warmup_s=0.5 if quick else 1.0,
        upstream=ns.upstream,
        proxy_cores=frozenset({0}) if pinned else None,
        load_cores=frozenset({1}) if pinned else None,
        measurements=only,
        llmproxy_src=str(src),
        noise_limit=ns.noise_limit,
        retries=ns.retries if ns.retries is not None else (0 if quick else 2),
        quiet_wait_s=5.0 if quick else 30.0,
        quiet_budget_s=10.0 if quick else 180.0,
    )


# -- small helpers ---------------------------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def helper(
    procs: Processes, module: str, args: list[str], st: Settings, timeout_s: float
) -> dict[str, Any]:
    """Run ``python -m bench_lib.MODULE`` on the load core; its stdout is one JSON object."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    argv = procs.pinned([sys.executable, "-m", f"bench_lib.{module}", *args], st.load_cores)
    r = subprocess.run(
        argv, check=False, capture_output=True, text=True, env=env, timeout=timeout_s
    )
    if r.returncode in (-signal.SIGINT, 128 + signal.SIGINT):
        raise KeyboardInterrupt
    if r.returncode != 0:
        raise BenchError(f"{module} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def start_upstream(
    procs: Processes, st: Settings, *, kind: str, tokens_per_s: float, max_tokens: int
) -> tuple[Child, Endpoint]:
    if kind == "canned":
        child = procs.start(
            "fast-upstream",
            [sys.executable, "-m", "bench_lib.fast_upstream", "--port", "0"],
            cores=st.load_cores,
            env={**os.environ, "PYTHONPATH": str(HERE)},
        )
    else:
        child = procs.start(
            "sim",
            [
                sys.executable, "-m", "llmproxy.sim", "--port", "0", "--model", MODEL,
                "--ttft-ms", "0", "--tokens-per-s", f"{tokens_per_s:g}",
                "--max-tokens-default", str(max_tokens),
            ],
            cores=st.load_cores,
            cwd=Path(st.llmproxy_src),
            env={**os.environ, "PYTHONPATH": st.llmproxy_src},
        )  # fmt: skip
    m = procs.wait_for_output(child, UPSTREAM_READY, 30)
    return child, Endpoint(m.group(1), int(m.group(2)))


class Guard:
    """Runs each measurement on a quiet machine, and again if others disturbed it.

    The proxy has core 0 to itself only if nothing else runs there: on a machine
    shared with other work (test suites, builds), a run can lose half its core.
    Waiting and repeating share one time budget, so the benchmark stays bounded
    on a busy machine; past it, runs go ahead and are flagged in the report.
    """

    def __init__(self, st: Settings, log: Log) -> None:
        self._st = st
        self._log = log
        self._budget_end = time.monotonic() + st.quiet_budget_s

    def _left(self) -> float:
        return max(0.0, self._budget_end - time.monotonic())

    def run(
        self, procs: Processes, label: str, measure: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        st = self._st
        out: dict[str, Any] = {}
        for attempt in range(1, st.retries + 2):
            waited, share = wait_quiet(procs, st.noise_limit, min(st.quiet_wait_s, self._left()))
            if waited > 1:
                self._log(f"waited {waited:.0f} s for other processes (now {share:.0%} of a core)")
            t0 = time.monotonic()
            with ForeignCpu(procs) as foreign:
                out = measure()
            out.update(foreign_cpu_share=foreign.share, attempt=attempt, quiet_wait_s=waited)
            if foreign.share <= st.noise_limit:
                break
            again = attempt <= st.retries and self._left() > time.monotonic() - t0
            self._log(
                f"{label}: other processes used {foreign.share:.0%} of a core meanwhile"
                + ("; running it again" if again else "; keeping it, flagged")
            )
            if not again:
                break
        return out


def rotated(items: list[Running], i: int) -> list[Running]:
    """Targets in a different order each run, so none always goes first."""
    k = i % len(items)
    return items[k:] + items[:k]


def start_targets(
    procs: Processes,
    kinds: list[TargetKind],
    upstream: Endpoint,
    *,
    workdir: Path,
    st: Settings,
    log: Log,
) -> list[Running]:
    running = []
    for kind in kinds:
        t = kind.start(procs, upstream, workdir, st.proxy_cores)
        if t.pids:
            log(f"{t.name} on {t.endpoint.url}, pids {t.pids} on cores {cores_of(t.pids[0])}")
        smoke_test(procs, t)
        running.append(t)
    return running


def smoke_test(procs: Processes, t: Running) -> None:
    """One request before measuring: a target that answers errors is not measured."""
    req = urllib.request.Request(
        t.endpoint.url + PATH,
        data=SMALL_BODY.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return
    except urllib.error.HTTPError as exc:
        why = f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc}"
    logs = "\n".join(c.log_tail(30) for c in procs.children if c.pid in t.pids)
    raise BenchError(f"{t.name} failed a first request ({why}); its log:\n{logs}")


def sim_stats(upstream: Endpoint) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{upstream.url}/sim/stats", timeout=5) as r:
            stats: dict[str, Any] = json.load(r)
            return stats
    except OSError as exc:
        raise BenchError(f"the simulated replica stopped answering: {exc}") from exc


def wait_upstream_idle(upstream: Endpoint, timeout_s: float) -> tuple[int, float]:
    """Wait until the replica generates nothing; (streams still running, seconds waited).

    Every client has gone at this point, so whatever still runs is an upstream
    request the proxy failed to cancel (FIELD-NOTES, failure 1).
    """
    t0 = time.monotonic()
    while True:
        s = sim_stats(upstream)
        left = int(s.get("running", 0)) + int(s.get("waiting", 0))
        waited = time.monotonic() - t0
        if left == 0 or waited > timeout_s:
            return left, waited
        time.sleep(0.05)


# -- the three measurements ------------------------------------------------------------------


def measure_latency(procs: Processes, st: Settings, t: Running) -> dict[str, Any]:
    args = [
        "--host", t.endpoint.host, "--port", str(t.endpoint.port), "--path", PATH,
        "--body", SMALL_BODY, "--n", str(st.latency_requests), "--warmup", str(st.latency_warmup),
    ]  # fmt: skip
    out = helper(procs, "latency_client", args, st, timeout_s=120)
    stats = report.latency_stats(out["samples_us"])
    stats.update(errors=out["errors"], reconnects=out["reconnects"])
    return stats


def measure_throughput(
    procs: Processes, st: Settings, t: Running, script: Path, *, upstream_pid: int, seconds: int
) -> dict[str, Any]:
    up0 = cpu_seconds([upstream_pid])
    out: dict[str, Any] = wrk.run_wrk(
        procs, t.endpoint.url + PATH, script, connections=st.wrk_connections,
        duration_s=seconds, cores=st.load_cores, cpu_pids=t.pids,
    )  # fmt: skip
    out["upstream_cpu_share"] = (cpu_seconds([upstream_pid]) - up0) / (out["duration_us"] / 1e6)
    return out


def measure_streams(
    procs: Processes, st: Settings, t: Running, upstream: Endpoint, upstream_pid: int
) -> dict[str, Any]:
    args = [
        "--host", t.endpoint.host, "--port", str(t.endpoint.port), "--path", PATH,
        "--model", MODEL, "--streams", str(st.sse_streams),
        "--max-tokens", str(st.sse_max_tokens), "--warmup-s", str(st.sse_warmup_s),
        "--window-s", str(st.sse_window_s), "--pids", ",".join(map(str, t.pids)),
        "--upstream-pids", str(upstream_pid),
    ]  # fmt: skip
    rss_before = rss_bytes(t.pids) if t.pids else 0
    out = helper(procs, "sse_load", args, st, timeout_s=st.sse_window_s + st.sse_warmup_s + 90)
    out["rss_before_bytes"] = rss_before
    # Every client has gone: whatever the replica still generates, the proxy did not cancel.
    left, waited = wait_upstream_idle(upstream, timeout_s=10)
    out["upstream_left_running"] = left
    out["upstream_drain_s"] = waited
    return out


def phase_small_requests(
    kinds: list[TargetKind],
    st: Settings,
    workdir: Path,
    raw: dict[str, Any],
    *,
    log: Log,
    guard: Guard,
) -> None:
    """Measurements 1 and 2, against the fast upstream."""
    with Processes(workdir) as procs:
        up_child, upstream = start_upstream(
            procs, st, kind=st.upstream, tokens_per_s=0, max_tokens=1
        )
        log(f"upstream ({st.upstream}) on {upstream.url}, cores {cores_of(up_child.pid)}")
        running = start_targets(procs, kinds, upstream, workdir=workdir, st=st, log=log)

        if "latency" in st.measurements:
            for i in range(st.runs):
                for t in rotated(running, i):
                    label = f"latency run {i + 1}/{st.runs} {t.name}"
                    r = guard.run(procs, label, partial(measure_latency, procs, st, t))
                    raw["latency"].setdefault(t.name, []).append(r)
                    log(
                        f"{label}: p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                        f"errors {r['errors']}"
                    )

        if "throughput" in st.measurements:
            script = wrk.write_script(workdir / "post.lua", SMALL_BODY)
            for t in running:  # warm-up: connections, caches, lazily built objects
                measure_throughput(
                    procs, st, t, script, upstream_pid=up_child.pid, seconds=st.wrk_warmup_seconds
                )
            for i in range(st.runs):
                for t in rotated(running, i):
                    label = f"throughput run {i + 1}/{st.runs} {t.name}"
                    measure = partial(
                        measure_throughput, procs, st, t, script,
                        upstream_pid=up_child.pid, seconds=st.wrk_seconds,
                    )  # fmt: skip
                    r = guard.run(procs, label, measure)
                    raw["throughput"].setdefault(t.name, []).append(r)
                    busy = (
                        f", proxy core {100 * r['target_cpu_share']:.0f}% busy, "
                        f"{r['target_cpu_us_per_request']:.0f} µs CPU/request"
                        if t.pids
                        else ""
                    )
                    log(
                        f"{label}: {r['rps']:,.0f} req/s, non-2xx {r['status']:.0f}, "
                        f"socket errors {r['socket_errors']:.0f}" + busy
                    )


def phase_sse(
    kinds: list[TargetKind],
    st: Settings,
    workdir: Path,
    raw: dict[str, Any],
    *,
    log: Log,
    guard: Guard,
) -> None:
    """Measurement 3: many long streams from the simulated replica."""
    with Processes(workdir) as procs:
        sim, upstream = start_upstream(
            procs, st, kind="sim", tokens_per_s=SSE_TOKENS_PER_S, max_tokens=st.sse_max_tokens
        )
        log(f"upstream (sim, {SSE_TOKENS_PER_S:g} tokens/s) on {upstream.url}")
        running = start_targets(procs, kinds, upstream, workdir=workdir, st=st, log=log)
        for t in running:
            if t.pids:
                raw["memory"][t.name] = {"rss_start_bytes": rss_bytes(t.pids)}
        for i in range(st.runs):
            for t in rotated(running, i):
                label = f"sse run {i + 1}/{st.runs} {t.name}"
                measure = partial(measure_streams, procs, st, t, upstream, sim.pid)
                r = guard.run(procs, label, measure)
                raw["sse"].setdefault(t.name, []).append(r)
                per_event = (
                    f", {r['target_cpu_s'] / max(r['events'], 1) * 1e6:.1f} µs CPU/event, "
                    f"RSS {r['target_rss_bytes'] / 2**20:.1f} MiB"
                    if t.pids
                    else ""
                )
                left = r["upstream_left_running"]
                log(
                    f"{label}: {r['streams_streaming']} streams, {r['events_per_s']:,.0f} events/s"
                    + per_event
                    + f", upstream core {100 * r['upstream_cpu_s'] / r['window_s']:.0f}%"
                    + (f", {left} upstream streams left running" if left else "")
                )
        time.sleep(1.0)
        for t in running:
            if t.pids:
                raw["memory"][t.name]["rss_end_bytes"] = rss_bytes(t.pids)


# -- report ----------------------------------------------------------------------------------


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
            out.append(f"**{t} {measurement}: {what}: its numbers are marked (!) and invalid**")
    for t, runs in raw["latency"].items():
        rec = sum(r["reconnects"] for r in runs)
        if rec:
            out.append(f"latency {t}: the server closed the keep-alive connection {rec} times")
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
    kept = [
        (measurement, t, r)
        for measurement in ("latency", "throughput", "sse")
        for t, runs in raw[measurement].items()
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
        f"{st['sse_window_s']:g} s window. Upstream of the small requests: {st['upstream']}.",
        "",
        report.markdown_table(doc["summary"], doc["targets"], report.invalid_cells(doc["raw"])),
        "",
        "Notes:",
        *(f"- {n}" for n in notes(doc)),
        f"- wall time {doc['elapsed_s']:.0f} s",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _raise_fd_limit() -> None:
    """1,000 streams take 2,000+ descriptors in the proxy; lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    """Medians, ratios and goals from the raw runs (also for a reloaded file)."""
    raw, targets = doc["raw"], doc["targets"]
    doc["summary"] = summary = report.summarize(raw, targets)
    doc["ratios"] = report.ratios(summary, targets)
    doc["goals"] = report.goals(summary, report.invalid_cells(raw))
    return doc


def export_commit(rev: str, into: Path) -> tuple[Path, str]:
    """``git archive REV`` of this repository into ``into``; (checkout, short commit)."""
    short = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"],
        check=False, capture_output=True, text=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    if not short:
        raise BenchError(f"--commit {rev}: no such commit in {REPO}")
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", short], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=False)
    if archive.stdout is not None:
        archive.stdout.close()
    if archive.wait(timeout=60) != 0 or tar.returncode != 0:
        raise BenchError(f"--commit {rev}: git archive | tar failed")
    return into, short


def measure(ns: argparse.Namespace) -> dict[str, Any] | None:
    """Run the measurements; the document ``--json`` writes, or None on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    workdir.chmod(0o755)
    log = Log()
    try:
        return _measure(ns, workdir, log)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return None
    finally:
        if ns.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _measure(ns: argparse.Namespace, workdir: Path, log: Log) -> dict[str, Any]:
    ncpu = os.cpu_count() or 1
    if ns.commit:
        src, short = export_commit(ns.commit, workdir / "src")
        git = f"{short} (exported with git archive)"
    else:
        src = ns.llmproxy_src.resolve()
        git = git_state(str(src))
    st = settings_from(ns, ncpu, src)
    _raise_fd_limit()
    if st.load_cores is not None:
        os.sched_setaffinity(0, st.load_cores)  # the driver and every helper it starts
    else:
        log(f"only {ncpu} core: nothing is pinned; numbers mix proxy and load-generator CPU")

    known = target_kinds(src)
    wanted = [t for t in ns.targets.split(",") if t]
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise SystemExit(f"--targets: unknown {unknown}; known: {list(known)}")
    for required in (report.DIRECT, report.SUBJECT):
        if required not in wanted:
            wanted.insert(0 if required == report.DIRECT else 1, required)
    skipped = {n: why for n in wanted if (why := known[n].unavailable()) is not None}
    if report.SUBJECT in skipped:
        raise SystemExit(f"cannot measure llmproxy: {skipped[report.SUBJECT]}")
    chosen = [known[n] for n in wanted if n not in skipped]

    raw: dict[str, Any] = {"latency": {}, "throughput": {}, "sse": {}, "memory": {}}
    command = shlex.join(["python", "loadtests/bench.py", *sys.argv[1:]])
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log(f"{command}; llmproxy {src} (git {git}); work dir {workdir}")
    guard = Guard(st, log)
    if {"latency", "throughput"} & set(st.measurements):
        phase_small_requests(chosen, st, workdir, raw, log=log, guard=guard)
    if "sse" in st.measurements:
        phase_sse(chosen, st, workdir, raw, log=log, guard=guard)

    settings = asdict(st)
    settings["proxy_cores"] = sorted(st.proxy_cores) if st.proxy_cores else None
    settings["load_cores"] = sorted(st.load_cores) if st.load_cores else None
    settings["sse_tokens_per_s"] = SSE_TOKENS_PER_S
    settings["sse_max_tokens"] = st.sse_max_tokens
    return finish(
        {
            "format": 1,
            "command": command,
            "started": started,
            "elapsed_s": time.monotonic() - log.t0,
            "machine": machine_info(str(src), git),
            "settings": settings,
            "targets": [k.name for k in chosen],
            "skipped": skipped,
            "raw": raw,
        }
    )


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    if ns.render is not None:
        doc = finish(json.loads(ns.render.read_text()))
    else:
        try:
            measured = measure(ns)
        except KeyboardInterrupt:
            print("bench: interrupted; every process it started is stopped", file=sys.stderr)
            return 130
        if measured is None:
            return 1
        doc = measured
    print(render(doc))
    if ns.json:
        ns.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nraw numbers written to {ns.json}")
    if ns.compare:
        baseline = json.loads(ns.compare.read_text())
        table, worse = report.compare(doc, baseline, ns.margin)
        print(f"\n### Compared with {ns.compare} ({baseline.get('started', '?')})\n")
        print(table)
        for name, d in (("this run", doc), ("the baseline", baseline)):
            share = report.worst_foreign_share(d)
            if share > d.get("settings", {}).get("noise_limit", 0.1):
                print(f"\nNote: in {name}, other processes used up to {share:.0%} of a core.")
        print(
            f"\n{worse} value(s) worsened by more than {ns.margin:.0%}."
            if worse
            else f"\nNothing worsened by more than {ns.margin:.0%}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
