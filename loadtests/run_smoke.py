#!/usr/bin/env python3
"""Smoke load test: two simulated replicas and a gateway on loopback, a few seconds of Locust.

    python loadtests/run_smoke.py [--seconds 5] [--out DIR] [--summary-json FILE] [-- LOCUST ARGS]

Load shape and request options come from ``loadtests/profiles/smoke.conf``
(8 users, half of them streaming, 16 tokens each). Exits 0 only when Locust
finished cleanly, every request succeeded (no failure of any kind, no
exception in the locustfile), some requests were made, and every successful
stream recorded its time to first token. Bounded: about ``--seconds`` + 5 s,
killed at ``--seconds`` + 60 s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from locust_harness import (
    TPS_ROW,
    TTFT_ROW,
    Cluster,
    HarnessError,
    Verdict,
    add_common_arguments,
    exit_on_sigterm,
    format_stats,
    locust_command,
    locust_timeout,
    read_stats,
    results_dir,
    running_locust,
    vars_of,
    wait_locust,
    write_summary,
)

#: A quick replica: 20 ms to first token, 200 tokens/s.
SIM_ARGS = ("--model", "sim-model", "--ttft-ms", "20", "--tokens-per-s", "200")
REPLICAS = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_common_arguments(parser, "smoke.conf", seconds=5)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    out = results_dir("smoke", args.out)
    csv_prefix = out / "locust"
    extra = ["--run-time", f"{args.seconds}s", *args.locust_args]

    try:
        with Cluster(out) as cluster:
            sims = cluster.sims(REPLICAS, SIM_ARGS)
            gateway = cluster.gateway([s.url for s in sims])
            print(f"replicas: {', '.join(s.url for s in sims)}; gateway: {gateway.url}")
            command = locust_command(gateway.url, args.profile, csv_prefix, extra)
            print("$", " ".join(command), flush=True)
            with running_locust(command, out / "locust.log") as locust:
                code = wait_locust(locust, locust_timeout(args.seconds))
        stats = read_stats(csv_prefix)
    except HarnessError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        write_summary(args.summary_json, {"passed": False, "error": str(exc)})
        return 1

    stream, ttft = stats.row(("POST", "chat-stream")), stats.row(TTFT_ROW)
    good_streams = stream.count - stream.failures if stream else 0
    verdict = Verdict()
    verdict.check(f"locust exit code {code}", code == 0)
    succeeded = stats.requests - stats.failed
    verdict.check(f"requests succeeded: {succeeded}", succeeded > 0)
    verdict.check(f"failed requests: {stats.failed}", stats.failed == 0 and not stats.failures)
    verdict.check(f"locustfile exceptions: {len(stats.exceptions)}", not stats.exceptions)
    verdict.check(
        f"TTFT recorded for each good stream ({ttft.count if ttft else 0} ≥ {good_streams})",
        (ttft.count if ttft else 0) >= good_streams,
    )
    print(format_stats(stats))
    print(verdict.report())
    write_summary(
        args.summary_json,
        {
            "passed": verdict.passed,
            "locust_exit_code": code,
            "checks": verdict.checks,
            "ttft_ms": vars_of(stats.row(TTFT_ROW)),
            "tokens_per_s": vars_of(stats.row(TPS_ROW)),
            **stats.to_json(),
        },
    )
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
