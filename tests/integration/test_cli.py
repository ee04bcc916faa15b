"""The command line as a user runs it: exit codes and messages, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from llmproxy.policy.auth import hash_key


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


def test_check_config_ok_and_errors(tmp_path: Path) -> None:
    ok = run("check-config", "config/dev.yaml")
    assert ok.returncode == 0
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "pools:\n  main:\n    balancer: fastest\n    backends: [not-a-url]\n"
        "routes:\n  - {name: r, pool: mian}\n"
    )
    out = run("check-config", str(bad))
    assert out.returncode == 1
    assert "pools.main.balancer: unknown balancer 'fastest'" in out.stderr
    assert "pools.main.backends[0]" in out.stderr
    assert "routes[0].pool" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_refuses_an_invalid_config_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: {}\n")
    out = run("serve", "--config", str(bad))
    assert out.returncode == 2
    assert "invalid config" in out.stderr
    assert "Traceback" not in out.stderr


def test_hash_key_prints_a_loadable_entry() -> None:
    out = run("hash-key", "--name", "team-a")
    assert out.returncode == 0
    entry = yaml.safe_load(out.stdout)[0]
    key = next(line.split()[-1] for line in out.stdout.splitlines() if "sk-" in line)
    assert entry == {"name": "team-a", "sha256": hash_key(key)}
    assert run("hash-key", "has space").returncode == 2
