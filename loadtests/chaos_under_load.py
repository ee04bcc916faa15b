#!/usr/bin/env python3
"""Chaos under load: SIGKILL one of three replicas mid-run, restart it, judge the error rate.

    python loadtests/chaos_under_load.py [--seconds 15] [--kill-at 5] [--restart-at 10]
        [--max-error-rate 0.01] [--out DIR] [--summary-json FILE] [-- LOCUST ARGS]

Three simulated replicas and a gateway (health checks every 0.2 s) on loopback,
Locust with ``loadtests/profiles/chaos.conf`` (24 users, half streaming). Times
count from the first request the replicas see. At ``--kill-at`` s replica 0
gets SIGKILL; at ``--restart-at`` s a new replica starts on its port.

PASS when:
- no request failed before its first byte (the gateway retries those on
  another replica, so a client never sees them);
- no stream stopped without [DONE] or an SSE error event, and no 200 had a
  malformed body (the commit-point contract, ARCHITECTURE.md §2);
- failures of every kind, the expected ones included (streams cut mid-way on
  the killed replica, which end with an SSE error event), are at most
  ``--max-error-rate`` of the requests;
- the restarted replica served requests again before the end.
Bounded: about ``--seconds`` + 10 s, killed at ``--seconds`` + 60 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from locust_harness import (
    Child,
    Cluster,
    HarnessError,
    Stats,
    Verdict,
    add_common_arguments,
    exit_on_sigterm,
    format_stats,
    locust_command,
    locust_timeout,
    read_stats,
    results_dir,
    running_locust,
    sim_requests,
    wait_locust,
    write_summary,
)

#: A small replica: 20 ms to first token, 100 tokens/s (a 32-token stream takes ~0.35 s).
SIM_ARGS = ("--model", "sim-model", "--ttft-ms", "20", "--tokens-per-s", "100")
REPLICAS = 3
#: Pool settings that notice a dead or returning replica within a second.
POOL: dict[str, Any] = {
    "balancer": "least_connections",
    "health": {
        "interval_s": 0.2,
        "timeout_s": 0.5,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    },
    "breaker": {"failure_threshold": 3, "reset_timeout_s": 1.0},
    "retry": {
        "attempts": 3,
        "budget_ratio": 0.2,
        "min_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    },
    "timeouts": {"connect_s": 0.5, "first_byte_s": 5.0, "idle_s": 5.0, "total_s": 60.0},
    "outlier": {"consecutive_failures": 5, "base_ejection_s": 1.0, "max_ejection_s": 2.0},
    "slow_start_s": 0.0,
}


class Timeline:
    """Scenario times in seconds from the start of the load."""

    def __init__(self, locust: subprocess.Popen[bytes]) -> None:
        self.locust = locust
        self.start = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def note(self, what: str) -> None:
        self.events.append((self.now(), what))
        print(f"t={self.now():5.2f}s {what}", flush=True)

    def sleep_until(self, t: float) -> None:
        """Wait for scenario time ``t``; Locust quitting early is an error."""
        while (remaining := t - self.now()) > 0:
            if self.locust.poll() is not None:
                raise HarnessError(f"locust exited early (code {self.locust.returncode})")
            time.sleep(min(remaining, 0.1))


def wait_for_load(sims: Sequence[Child], locust: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once a replica has seen a request (Locust has started its users)."""
    deadline = time.monotonic() + timeout
    while not any(sim_requests(s.url) for s in sims):
        if locust.poll() is not None:
            raise HarnessError(f"locust exited before any request (code {locust.returncode})")
        if time.monotonic() > deadline:
            raise HarnessError(f"no request reached a replica within {timeout:.0f}s")
        time.sleep(0.05)


def judge(stats: Stats, code: int, reborn_requests: int, max_rate: float) -> Verdict:
    kinds = stats.failure_kinds()
    rate = stats.failed / stats.requests if stats.requests else 1.0
    verdict = Verdict()
    verdict.check(f"locust finished normally (exit code {code})", code == 0)
    verdict.check(f"locustfile exceptions: {len(stats.exceptions)}", not stats.exceptions)
    verdict.check(f"requests made: {stats.requests}", stats.requests > 0)
    verdict.check(
        f"failures before the first byte: {kinds['pre-first-byte']}", kinds["pre-first-byte"] == 0
    )
    silent = kinds["truncated"] + kinds["bad-response"] + kinds["other"]
    verdict.check(
        f"streams cut without an error event, malformed bodies, others: {silent}", silent == 0
    )
    verdict.check(
        f"failure rate {rate:.3%} ≤ {max_rate:.3%} "
        f"({stats.failed} of {stats.requests}; {kinds['sse-error-event']} streams "
        f"ended with an SSE error event)",
        rate <= max_rate,
    )
    verdict.check(f"restarted replica served {reborn_requests} requests", reborn_requests > 0)
    return verdict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_common_arguments(parser, "chaos.conf", seconds=15)
    parser.add_argument("--kill-at", type=float, default=5.0, help="s into the load (5)")
    parser.add_argument("--restart-at", type=float, default=10.0, help="s into the load (10)")
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="largest share of failed requests that passes (0.01)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.restart_at < args.seconds:
        parser.error("need 0 < --kill-at < --restart-at < --seconds")
    exit_on_sigterm()
    out = results_dir("chaos", args.out)
    csv_prefix = out / "locust"
    extra = ["--run-time", f"{args.seconds}s", "--exit-code-on-error", "0", *args.locust_args]

    try:
        with Cluster(out) as cluster:
            sims = cluster.sims(REPLICAS, SIM_ARGS)
            gateway = cluster.gateway([s.url for s in sims], POOL)
            print(f"replicas: {', '.join(s.url for s in sims)}; gateway: {gateway.url}")
            command = locust_command(gateway.url, args.profile, csv_prefix, extra)
            print("$", " ".join(command), flush=True)
            with running_locust(command, out / "locust.log") as locust:
                wait_for_load(sims, locust, timeout=30)
                timeline = Timeline(locust)
                timeline.note("load started")
                victim = sims[0]
                timeline.sleep_until(args.kill_at)
                served = sim_requests(victim.url)
                victim.kill()
                timeline.note(f"SIGKILL replica {victim.url} (it had received {served} requests)")
                timeline.sleep_until(args.restart_at)
                timeline.note(f"restarting a replica on port {victim.port}")
                reborn = cluster.sim("sim0-restarted", SIM_ARGS, port=victim.port)
                timeline.note(f"restarted replica listening on {reborn.url}")
                code = wait_locust(locust, locust_timeout(args.seconds))
                timeline.note(f"locust done (exit code {code})")
            reborn_requests = sim_requests(reborn.url)
            survivors = {s.url: sim_requests(s.url) for s in sims[1:]}
        stats = read_stats(csv_prefix)
    except HarnessError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        write_summary(args.summary_json, {"passed": False, "error": str(exc)})
        return 1

    verdict = judge(stats, code, reborn_requests, args.max_error_rate)
    print(
        f"requests per replica: killed one {served} before the kill, restarted one "
        f"{reborn_requests}, " + ", ".join(f"{u} {n}" for u, n in survivors.items())
    )
    print(format_stats(stats))
    print(verdict.report())
    write_summary(
        args.summary_json,
        {
            "passed": verdict.passed,
            "locust_exit_code": code,
            "checks": verdict.checks,
            "timeline": timeline.events,
            "killed_replica_requests": served,
            "restarted_replica_requests": reborn_requests,
            "surviving_replica_requests": survivors,
            **stats.to_json(),
        },
    )
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
