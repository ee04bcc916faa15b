"""``loadtests/instructions.py`` counts a real gateway's instructions end to end.

The script starts its own upstreams and a gateway under callgrind on port 0,
counts three windows of traffic and stops them. A short run (about a minute,
nearly all of it the gateway starting twice under valgrind): the counts must
be plausible, written, and compared with a baseline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_counts_are_plausible_written_and_compared(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed: apt-get install valgrind (.ci/run does)")
    baseline = tmp_path / "baseline.json"
    # A baseline where every count was far lower: all three must be reported.
    baseline.write_text(json.dumps({"per_request": 1, "per_stream": 1, "per_event": 1}))
    out = tmp_path / "counts.json"
    r = subprocess.run(
        [
            sys.executable, str(ROOT / "loadtests" / "instructions.py"),
            "--requests", "20", "--streams", "3", "--tokens", "31", "--warmup", "20",
            "--tokens-per-s", "300", "--json", str(out), "--compare", str(baseline),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = json.loads(out.read_text())
    # A request through the gateway is hundreds of thousands of instructions
    # (the interpreter); an event relayed on an open stream, thousands.
    assert 50_000 < counts["per_request"] < 50_000_000, counts
    assert 50_000 < counts["per_stream"] < 50_000_000, counts
    assert 500 < counts["per_event"] < counts["per_request"], counts
    assert r.stdout.count("worse:") == 3, r.stdout
