"""How late a process that does nothing wakes up on a core: the core's own noise.

``taskset -c 0 python -m bench_lib.wake_probe --period-ms 1``

Sleeps ``--period-ms`` at a time until SIGTERM (or ``--seconds``), recording
how much later than asked each sleep ended, then prints one JSON object on
stdout. The benchmark runs it on the proxy's core during the direct SSE run,
when that core has nothing else to do: whatever lateness it sees (the
hypervisor running another guest's vCPU, the guest agent, kernel workers) also
lands on a proxy's inter-token gaps there, and no proxy can add less.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from array import array
from collections.abc import Sequence
from types import FrameType

from bench_lib.report import percentile


def probe(period_s: float, seconds: float | None) -> dict[str, float]:
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    late = array("d")
    clock = time.perf_counter
    began = clock()
    end = began + seconds if seconds is not None else float("inf")
    while not stop:
        t0 = clock()
        if t0 >= end:
            break
        time.sleep(period_s)
        late.append(clock() - t0 - period_s)
    return stats(late, clock() - began)


def stats(late_s: array[float], elapsed_s: float) -> dict[str, float]:
    """Lateness percentiles per sleep, and per moment: ``wait_p99_ms`` is the
    wait that work arriving at a random moment exceeds 1 % of the time (a
    5 ms stall delays everything due in those 5 ms, not one sample). ms."""
    s = sorted(late_s)
    if not s or elapsed_s <= 0:
        return {"n": len(s)}
    return {
        "n": len(s),
        "p50_ms": percentile(s, 50) * 1e3,
        "p99_ms": percentile(s, 99) * 1e3,
        "p999_ms": percentile(s, 99.9) * 1e3,
        "max_ms": s[-1] * 1e3,
        "wait_p99_ms": time_weighted(s, elapsed_s, 0.01) * 1e3,
        "wait_p999_ms": time_weighted(s, elapsed_s, 0.001) * 1e3,
    }


def time_weighted(late_s: Sequence[float], elapsed_s: float, share: float) -> float:
    """The wait ``d`` with ``share`` of all moments waiting longer than ``d``.

    Work arriving ``x`` s into a wake-up that came ``L`` s late waits ``L - x``;
    the time during which the wait exceeds ``d`` is ``sum(max(0, L - d))``.
    That falls as ``d`` grows: bisect it to ``share * elapsed_s``.
    """
    lo, hi = 0.0, max(late_s)
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(x - mid for x in late_s if x > mid) > share * elapsed_s:
            lo = mid
        else:
            hi = mid
    return hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--period-ms", type=float, default=1.0, help="length of each sleep")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    ns = p.parse_args()
    if ns.period_ms <= 0:
        p.error("--period-ms must be positive")
    out = probe(ns.period_ms / 1e3, ns.seconds)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
