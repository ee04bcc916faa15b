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
3. time to first token at concurrency 1: sequential small streamed POSTs to a
   replica with no time to first token; p50/p99 and what each proxy adds;
4. CPU per relayed SSE event: 1,000 concurrent streams from a simulated
   replica at 20 tokens/s (50 ms between events); the proxy's CPU time over a
   window divided by the events the clients received in it; its RSS; and the
   gap between consecutive events of a stream (p50/p99/p99.9), and what each
   proxy adds to the direct gaps;
5. memory of idle streams: 5,000 streams open at once, idle after their first
   event; the proxy's peak RSS over its RSS before, per 1,000 streams;
6. holding: 10,000 streams open at once, each with its first event: how many
   were held, how many failed.

The proxy under test runs on core 0 (one process); the upstream, the load
generators and this driver on core 1. Each measurement runs ``--runs`` times
(targets interleaved, their order rotated each run) and the median is
reported. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench_lib import report
from bench_lib.phases import (
    Guard,
    phase_hold,
    phase_small_requests,
    phase_sse,
    phase_ttft,
    phase_workers,
)
from bench_lib.procs import BenchError
from bench_lib.render import git_state, machine_info, render
from bench_lib.settings import (
    HOLD_TOKENS_PER_S,
    MEASUREMENTS,
    SSE_TOKENS_PER_S,
    Log,
    Settings,
)
from bench_lib.targets import NAMES, REPO, nofile_limit, target_kinds


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
        "replica (ttft 0); measurements 3-6 always use the simulated replica",
    )
    p.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams")
    p.add_argument(
        "--idle-streams",
        type=int,
        help="idle streams open at once for the memory measurement (default 5000; --quick 1000)",
    )
    p.add_argument(
        "--hold-streams",
        type=int,
        help="streams to hold open at once (default 10000; --quick 2000)",
    )
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
        ttft_requests=300 if quick else 2000,
        ttft_warmup=50 if quick else 200,
        idle_streams=ns.idle_streams or (1000 if quick else 5000),
        hold_streams=ns.hold_streams or (2000 if quick else 10000),
        hold_s=1.0 if quick else 2.0,
    )


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _raise_fd_limit() -> None:
    """A stream takes two descriptors in the proxy; lift the soft limit to the hard one.

    The children (proxies, replica, load generators) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = nofile_limit()
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    """Medians, ratios and goals from the raw runs (also for a reloaded file)."""
    raw, targets = doc["raw"], doc["targets"]
    doc["summary"] = summary = report.summarize(raw, targets)
    paired = report.paired_ratios(raw, targets)
    doc["ratios"] = report.ratios(summary, targets, paired)
    doc["goals"] = report.goals(
        summary, report.invalid_cells(raw), report.limited_cells(raw), paired
    )
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

    sizes = {"sse": st.sse_streams, "idle": st.idle_streams, "hold": st.hold_streams}
    busiest = max((n for m, n in sizes.items() if m in st.measurements), default=0)
    known = target_kinds(src, max_streams=busiest)
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

    raw: dict[str, Any] = {m: {} for m in (*MEASUREMENTS, "memory")}
    command = shlex.join(["python", "loadtests/bench.py", *sys.argv[1:]])
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log(f"{command}; llmproxy {src} (git {git}); work dir {workdir}")
    guard = Guard(st, log)
    if {"latency", "throughput"} & set(st.measurements):
        phase_small_requests(chosen, st, workdir, raw, log=log, guard=guard)
    if "ttft" in st.measurements:
        phase_ttft(chosen, st, workdir, raw, log=log, guard=guard)
    if "sse" in st.measurements:
        phase_sse(chosen, st, workdir, raw, log=log, guard=guard)
    for measurement, streams in (("idle", st.idle_streams), ("hold", st.hold_streams)):
        if measurement in st.measurements:
            phase_hold(
                chosen, st, workdir, raw, log=log, guard=guard,
                measurement=measurement, streams=streams,
            )  # fmt: skip
    if "workers" in st.measurements:
        phase_workers(st, workdir, raw, log=log, guard=guard)

    settings = asdict(st)
    settings["proxy_cores"] = sorted(st.proxy_cores) if st.proxy_cores else None
    settings["load_cores"] = sorted(st.load_cores) if st.load_cores else None
    settings["sse_tokens_per_s"] = SSE_TOKENS_PER_S
    settings["sse_max_tokens"] = st.sse_max_tokens
    settings["hold_tokens_per_s"] = HOLD_TOKENS_PER_S
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
        keys = (
            "runs",
            "latency_requests",
            "wrk_seconds",
            "sse_window_s",
            "sse_streams",
            "upstream",
            "ttft_requests",
            "idle_streams",
            "hold_streams",
        )
        mine, theirs = doc.get("settings", {}), baseline.get("settings", {})
        differ = [k for k in keys if k in mine and k in theirs and mine[k] != theirs[k]]
        if differ:
            print(
                "\nNote: the two runs differ in "
                + ", ".join(f"{k} ({theirs.get(k)} then, {mine.get(k)} now)" for k in differ)
                + ": tails (p99) and short windows are noisier; compare like with like."
            )
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
