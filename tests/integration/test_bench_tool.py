"""``loadtests/bench.py --quick`` runs end to end and its regression check reports.

Direct, llmproxy and nginx side by side (nginx started by the script on a
free loopback port), three of the measurements in their quick sizes, and
the gateway with one and with two workers (about a minute). No figure is
asserted to be fast: what is checked is that every target was measured,
the report holds the goals and the idle-core probe, and ``--compare``
names what worsened against a baseline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_measures_all_three_and_compares(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: apt-get install nginx (.ci/run does)")
    # A baseline in which llmproxy did ten times nginx's requests/s: this run
    # must be reported as worse there, and the exit status must stay 0.
    saved = json.loads((ROOT / "loadtests" / "baseline.json").read_text())
    saved["ratios"]["rps:llmproxy/nginx"]["value"] = 10.0
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(saved))
    out = tmp_path / "run.json"
    r = subprocess.run(
        [
            sys.executable, str(ROOT / "loadtests" / "bench.py"), "--quick",
            "--only", "latency,throughput,sse,workers",
            "--json", str(out), "--compare", str(baseline),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    for measurement in ("latency", "throughput", "sse"):
        assert set(doc["raw"][measurement]) == {"direct", "llmproxy", "nginx"}, measurement
    summary = doc["summary"]
    # Every request answered: a proxy that failed some would show here.
    for target in ("llmproxy", "nginx"):
        assert summary["rps"][target] > 0
        assert summary["sse_events_per_s"][target] > 0
        assert 0 < summary["sse_cpu_us_per_event"][target] < 10_000
    # The idle-core probe ran beside the direct SSE run, and only there.
    wait = summary["sse_core_wait_max_ms"]
    assert set(wait) == {"direct"}
    assert wait["direct"] >= 0
    # One and two workers, each measured: a second worker that never took a
    # connection would still leave the first's rate, so look at both.
    assert summary["workers_rps_1"]["llmproxy"] > 0
    assert summary["workers_rps_2"]["llmproxy"] > 0
    assert "llmproxy" in summary["workers_scaling"]
    report = r.stdout
    assert "| 2 workers ÷ 1 worker, requests/s |" in report
    assert "| Requests/s, c=64, small POST (wrk) |" in report
    assert "≥ 0.2x nginx (#6)" in report
    assert "Proxy's core, idle: longest wait (ms)" in report
    worse = [line for line in report.splitlines() if "**WORSE**" in line]
    assert any("rps:llmproxy/nginx" in line for line in worse), report[-3000:]
