"""Throughput with wrk: small POSTs over keep-alive connections.

wrk's Lua ``done`` hook prints the summary as one JSON line, so nothing here
parses wrk's human-readable report. ``errors.status`` counts responses that
are not 2xx or 3xx; socket errors are reported by kind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench_lib.procs import BenchError, Processes, cpu_seconds

MARKER = "BENCH-JSON "

_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, "connect": %%d, '
    .. '"read": %%d, "write": %%d, "status": %%d, "timeout": %%d, '
    .. '"latency_p50_us": %%d, "latency_p99_us": %%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def write_script(path: Path, body: str) -> Path:
    path.write_text(_SCRIPT % {"body": body, "marker": MARKER})
    return path


def wrk_binary() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    return wrk


def version() -> str:
    r = subprocess.run(
        [wrk_binary(), "-v"], check=False, capture_output=True, text=True, timeout=10
    )
    return (r.stdout or r.stderr).splitlines()[0] if (r.stdout or r.stderr) else "?"


def run_wrk(
    procs: Processes,
    url: str,
    script: Path,
    *,
    connections: int,
    duration_s: int,
    cores: frozenset[int] | None,
    cpu_pids: list[int],
    threads: int = 1,
) -> dict[str, float]:
    """One wrk run; adds the CPU the target spent meanwhile."""
    argv = procs.pinned(
        [
            wrk_binary(),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        cores,
    )
    cpu0 = cpu_seconds(cpu_pids) if cpu_pids else 0.0
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration_s + 30)
    cpu1 = cpu_seconds(cpu_pids) if cpu_pids else 0.0
    for line in r.stdout.splitlines():
        if line.startswith(MARKER):
            out: dict[str, float] = json.loads(line[len(MARKER) :])
            break
    else:
        raise BenchError(f"wrk printed no summary (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    secs = out["duration_us"] / 1e6
    out["rps"] = out["requests"] / secs
    out["socket_errors"] = out["connect"] + out["read"] + out["write"] + out["timeout"]
    if cpu_pids:
        out["target_cpu_s"] = cpu1 - cpu0
        out["target_cpu_share"] = (cpu1 - cpu0) / secs
        out["target_cpu_us_per_request"] = (cpu1 - cpu0) / max(out["requests"], 1) * 1e6
    return out
