"""The measurements, each run against every target, and what they need.

Processes are started through :class:`~bench_lib.procs.Processes`, so each
phase stops everything it started when it ends, however it ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench_lib import report, wrk
from bench_lib.procs import (
    BenchError,
    Child,
    ForeignCpu,
    Processes,
    cores_of,
    cpu_seconds,
    fd_limit,
    open_fds,
    rss_bytes,
    wait_quiet,
)
from bench_lib.settings import (
    HERE,
    HOLD_MAX_TOKENS,
    HOLD_TOKENS_PER_S,
    MODEL,
    PATH,
    SMALL_BODY,
    SSE_TOKENS_PER_S,
    TTFT_BODY,
    UPSTREAM_READY,
    WORKER_COUNTS,
    Log,
    Settings,
)
from bench_lib.targets import Endpoint, Llmproxy, Running, TargetKind


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


def start_module(
    procs: Processes, name: str, module: str, args: list[str], cores: frozenset[int] | None
) -> Child:
    """Start ``python -m bench_lib.MODULE`` as a long-lived child (see :func:`helper`)."""
    argv = [sys.executable, "-m", f"bench_lib.{module}", *args]
    return procs.start(name, argv, cores=cores, env={**os.environ, "PYTHONPATH": str(HERE)})


def start_upstream(
    procs: Processes, st: Settings, *, kind: str, tokens_per_s: float, max_tokens: int
) -> tuple[Child, Endpoint]:
    if kind == "canned":
        child = start_module(
            procs, "fast-upstream", "fast_upstream", ["--port", "0"], st.load_cores
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


T = TypeVar("T")


def rotated(items: Sequence[T], i: int) -> list[T]:
    """Targets in a different order each run, so none always goes first."""
    k = i % len(items)
    return [*items[k:], *items[:k]]


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


# -- the measurements ------------------------------------------------------------------------


def measure_latency(procs: Processes, st: Settings, t: Running) -> dict[str, Any]:
    args = [
        "--host", t.endpoint.host, "--port", str(t.endpoint.port), "--path", PATH,
        "--body", SMALL_BODY, "--n", str(st.latency_requests), "--warmup", str(st.latency_warmup),
    ]  # fmt: skip
    out = helper(procs, "latency_client", args, st, timeout_s=120)
    stats = report.latency_stats(out["samples_us"])
    stats.update(errors=out["errors"], reconnects=out["reconnects"])
    return stats


def measure_ttft(procs: Processes, st: Settings, t: Running) -> dict[str, Any]:
    args = [
        "--host", t.endpoint.host, "--port", str(t.endpoint.port), "--path", PATH,
        "--body", TTFT_BODY, "--n", str(st.ttft_requests), "--warmup", str(st.ttft_warmup),
        "--sse",
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
    # Direct leaves the proxy's core idle: a sleeper there shows how late that
    # core lets any process wake (the host's noise), the floor under the gaps
    # a proxy on it can add.
    probe = None
    if not t.pids and st.proxy_cores:
        probe = start_module(
            procs, "wake-probe", "wake_probe", ["--period-ms", "1"], st.proxy_cores
        )
    try:
        out = helper(procs, "sse_load", args, st, timeout_s=st.sse_window_s + st.sse_warmup_s + 90)
    finally:
        if probe is not None:
            procs.stop(probe)
    if probe is not None and probe.proc.returncode == 0:
        out["core_wake"] = json.loads(probe.output())
    out["rss_before_bytes"] = rss_before
    # Every client has gone: whatever the replica still generates, the proxy did not cancel.
    left, waited = wait_upstream_idle(upstream, timeout_s=10)
    out["upstream_left_running"] = left
    out["upstream_drain_s"] = waited
    return out


def measure_hold(
    procs: Processes,
    st: Settings,
    t: Running,
    upstream: Endpoint,
    *,
    upstream_pid: int,
    streams: int,
) -> dict[str, Any]:
    ready_s = st.ready_timeout_s(streams)
    args = [
        "--host", t.endpoint.host, "--port", str(t.endpoint.port), "--path", PATH,
        "--model", MODEL, "--streams", str(streams), "--max-tokens", str(HOLD_MAX_TOKENS),
        "--ready-timeout-s", f"{ready_s:g}", "--hold-s", f"{st.hold_s:g}",
        "--pids", ",".join(map(str, t.pids)),
    ]  # fmt: skip
    # Descriptors: a proxy holds two per stream (client and upstream side), the
    # replica one; the process that needs them must be allowed that many.
    holder = t.pids or [upstream_pid]
    fds_before = open_fds(holder)
    out = helper(procs, "hold_load", args, st, timeout_s=ready_s + st.hold_s + 60)
    out["fd_limit"] = fd_limit(holder)
    out["fds_needed"] = fds_before + (2 if t.pids else 1) * streams
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


def phase_ttft(
    kinds: list[TargetKind],
    st: Settings,
    workdir: Path,
    raw: dict[str, Any],
    *,
    log: Log,
    guard: Guard,
) -> None:
    """Time to first token at concurrency 1, from a replica that answers at once."""
    with Processes(workdir) as procs:
        _, upstream = start_upstream(procs, st, kind="sim", tokens_per_s=0, max_tokens=1)
        log(f"upstream (sim, ttft 0, no delay between tokens) on {upstream.url}")
        running = start_targets(procs, kinds, upstream, workdir=workdir, st=st, log=log)
        for i in range(st.runs):
            for t in rotated(running, i):
                label = f"ttft run {i + 1}/{st.runs} {t.name}"
                r = guard.run(procs, label, partial(measure_ttft, procs, st, t))
                raw["ttft"].setdefault(t.name, []).append(r)
                log(
                    f"{label}: p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                    f"errors {r['errors']}"
                )


def phase_hold(
    kinds: list[TargetKind],
    st: Settings,
    workdir: Path,
    raw: dict[str, Any],
    *,
    log: Log,
    guard: Guard,
    measurement: str,
    streams: int,
) -> None:
    """Idle memory or holding: ``streams`` streams open at once, each after its first event.

    Every attempt (a run, or its repeat) starts its own replica and target: the
    memory a run leaves behind (Python rarely gives it back) would make the
    next one look free, a breaker a run opened would fail the next, and the
    connections it leaves in TIME_WAIT are not there to collide with the next.
    They are stopped (and reaped) inside the measured block, so their CPU counts
    as the benchmark's own, not as other processes'.
    """
    with Processes(workdir) as outer:
        for i in range(st.runs):
            for kind in rotated(kinds, i):
                label = f"{measurement} run {i + 1}/{st.runs} {kind.name}"
                measure = partial(fresh_hold, kind, st, workdir, log, streams)
                r = guard.run(outer, label, measure)
                raw[measurement].setdefault(kind.name, []).append(r)
                mem = (
                    f"; proxy RSS {r['rss_before_bytes'] / 2**20:.1f} -> peak "
                    f"{r['rss_peak_bytes'] / 2**20:.1f} MiB = "
                    f"{(r['rss_peak_bytes'] - r['rss_before_bytes']) / streams * 1000 / 1024:,.0f}"
                    f" KiB per 1,000 streams, descriptors peak {r['fds_peak']:,} of "
                    f"{r['fd_limit'] or 0:,}"
                    if r["proxy"]
                    else ""
                )
                left = r["upstream_left_running"]
                log(
                    f"{label}: held {r['held']:,}/{streams:,} (errors {r['errors']:,}), "
                    f"all up in {r['ready_s']:.1f} s"
                    + mem
                    + (f", {left} upstream streams left running" if left else "")
                )


def fresh_hold(
    kind: TargetKind, st: Settings, workdir: Path, log: Log, streams: int
) -> dict[str, Any]:
    """One idle or hold run against a replica and a target started for it alone."""
    with Processes(workdir) as procs:
        sim, upstream = start_upstream(
            procs, st, kind="sim", tokens_per_s=HOLD_TOKENS_PER_S, max_tokens=HOLD_MAX_TOKENS
        )
        (t,) = start_targets(procs, [kind], upstream, workdir=workdir, st=st, log=log)
        out = measure_hold(procs, st, t, upstream, upstream_pid=sim.pid, streams=streams)
        out["proxy"] = t.is_proxy
        return out


def phase_workers(
    st: Settings, workdir: Path, raw: dict[str, Any], *, log: Log, guard: Guard
) -> None:
    """Measurement 7: requests/s of the gateway with 1 and with 2 worker processes.

    Nothing is pinned (every process may use every core): the workers are
    there to use more than one. wrk (two threads) and the canned upstream
    share the same cores, so on a 2-core machine 2 workers cannot reach
    twice 1 worker's rate; the ratio is what the issue asks to see.
    """
    every = frozenset(range(os.cpu_count() or 1))
    # The driver is pinned to the load cores, and children inherit that: pin
    # these to every core explicitly.
    free = replace(st, load_cores=every, proxy_cores=every)
    with Processes(workdir) as procs:
        up_child, upstream = start_upstream(
            procs, free, kind="canned", tokens_per_s=0, max_tokens=1
        )
        log(f"upstream (canned) on {upstream.url}, cores {cores_of(up_child.pid)}")
        gateways: list[tuple[int, Running]] = []
        for n in WORKER_COUNTS:
            where = workdir / f"workers-{n}"
            where.mkdir(exist_ok=True)
            t = Llmproxy(Path(st.llmproxy_src), workers=n).start(procs, upstream, where, every)
            log(f"llmproxy with {n} worker(s) on {t.endpoint.url}, pids {t.pids}")
            smoke_test(procs, t)
            gateways.append((n, t))
        script = wrk.write_script(workdir / "post.lua", SMALL_BODY)

        def run(t: Running, seconds: int) -> dict[str, Any]:
            out: dict[str, Any] = wrk.run_wrk(
                procs, t.endpoint.url + PATH, script, connections=st.wrk_connections,
                duration_s=seconds, cores=every, cpu_pids=t.pids, threads=2,
            )  # fmt: skip
            return out

        for _, t in gateways:  # warm-up: every worker's connections and caches
            run(t, st.wrk_warmup_seconds)
        for i in range(st.runs):
            by_workers: dict[str, Any] = {}
            for n, t in rotated(gateways, i):
                label = f"workers run {i + 1}/{st.runs}, {n} worker(s)"
                r = guard.run(procs, label, partial(run, t, st.wrk_seconds))
                by_workers[str(n)] = r
                log(
                    f"{label}: {r['rps']:,.0f} req/s, non-2xx {r['status']:.0f}, "
                    f"socket errors {r['socket_errors']:.0f}, "
                    f"gateway CPU {r['target_cpu_share']:.2f} cores"
                )
            raw["workers"].setdefault(report.SUBJECT, []).append({"by_workers": by_workers})
