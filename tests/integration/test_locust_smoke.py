"""The Locust suite runs end to end: the CI smoke profile and a short chaos-under-load run.

Each runs its script (``loadtests/run_smoke.py``, ``loadtests/chaos_under_load.py``)
as a child process: Locust monkey-patches the standard library with gevent
when imported, which must not happen in this process. The scripts start their
own replicas and gateway on port 0 and stop them before they exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def locust_installed() -> None:
    # find_spec, not import: importing locust would gevent-patch this process.
    if importlib.util.find_spec("locust") is None:
        pytest.fail("locust is not installed: pip install -e '.[test]'")


def run_script(script: str, out: Path, *args: str, timeout: float) -> dict[str, Any]:
    """Run a load script to its end; its summary JSON, or a failure with its output."""
    summary = out / "summary.json"
    command = [
        sys.executable,
        str(ROOT / "loadtests" / script),
        "--out",
        str(out),
        "--summary-json",
        str(summary),
        *args,
    ]
    # Its own process group, so that a script stuck past the timeout goes
    # down together with the replicas, gateway and Locust it started.
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script stops its children on SIGTERM
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"{script} did not finish within {timeout}s:\n{output}\n{logs(out)}")
    result: dict[str, Any] = json.loads(summary.read_text()) if summary.exists() else {}
    failed_checks = [what for what, ok in result.get("checks", []) if not ok]
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}; failed checks: {failed_checks or result.get('error')}"
        f"\n{output}\n{logs(out)}"
    )
    return result


def logs(out: Path) -> str:
    """The tail of every log the script left (Locust's, the gateway's, the replicas')."""
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for log in sorted(out.glob("*.log"))
    )


def test_smoke_profile_passes_and_records_ttft(tmp_path: Path) -> None:
    summary = run_script("run_smoke.py", tmp_path, timeout=120)

    assert summary["passed"], summary
    assert summary["failed"] == 0
    assert summary["exceptions"] == []
    rows = summary["rows"]
    assert rows["POST chat"]["count"] > 0
    assert rows["POST chat-stream"]["count"] > 0
    ttft, tps = summary["ttft_ms"], summary["tokens_per_s"]
    # Every stream recorded its time to first token: at least the sim's 20 ms.
    assert ttft["count"] == rows["POST chat-stream"]["count"]
    assert 20 <= ttft["median"] < 1000
    # 16 tokens at the sim's 200 tokens/s: tokens per second, not per ms or µs.
    assert tps["count"] > 0
    assert 20 < tps["median"] < 2000


@pytest.mark.chaos
def test_chaos_under_load_shortened_passes(tmp_path: Path) -> None:
    # Shorter than the default 15 s, with shorter streams: the streams cut by
    # the kill are about those in flight then, so the error rate (≤ 1 %) grows
    # as the run shrinks unless the requests shrink too.
    args = ("--seconds", "12", "--kill-at", "3", "--restart-at", "6", "--", "--max-tokens", "16")
    summary = run_script("chaos_under_load.py", tmp_path, *args, timeout=120)

    assert summary["passed"], summary
    assert summary["requests"] > 0
    assert summary["failure_kinds"].get("pre-first-byte", 0) == 0
    assert summary["restarted_replica_requests"] > 0
    print(f"chaos: {summary['failed']} of {summary['requests']} failed: {summary['failure_kinds']}")
