"""``llmproxy status`` against a real gateway process, and its table renderer."""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmproxy.admin.status_cli import (
    BACKEND_COLUMNS,
    CLEAR,
    add_status_arguments,
    backend_status,
    render_state,
    run_status,
)
from tests.support import Gateway, Sim, pool_config, wait_for

TOKEN = "cli-admin-token"
FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 0.5, "healthy_threshold": 1,
               "unhealthy_threshold": 1, "jitter": 0}  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmproxy status")
    add_status_arguments(parser)
    return parser.parse_args(list(argv))


def run(*argv: str, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run_status(parse(*argv), out=out, err=err, **kwargs)
    return rc, out.getvalue(), err.getvalue()


def _backend(name: str, **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "name": name, "url": f"http://{name}", "weight": 2, "effective_weight": 1.5,
        "in_flight": 3, "healthy": True, "health_detail": "", "draining": False,
        "available": True, "eligible": True, "slow_start": False,
        "breaker": {"state": "closed", "fail_counter": 0, "in_flight": 0,
                    "probes_in_flight": 0, "opened_for_s": None},
        "outlier": {"consecutive_failures": 0, "ejected": False, "ejected_until_in_s": 0.0,
                    "times_ejected": 0, "ttfb_ewma_ms": 12.345, "samples": 4,
                    "weight_factor": 1.0},
    }  # fmt: skip
    for key, value in over.items():
        if isinstance(value, dict):
            b[key] = {**b[key], **value}
        else:
            b[key] = value
    return b


STATE: dict[str, Any] = {
    "ready": True,
    "draining": False,
    "config_source": "/etc/llmproxy.yaml",
    "last_reload": {"ok": False, "at": 1700000000.0, "errors": ["pools.x: bad"], "changes": []},
    "pools": {
        "stable": {
            "balancer": "least_connections",
            "eligible": 1,
            "retry_budget": {"requests": 10, "retries": 1, "allowed_now": True},
            "backends": [
                _backend("a:1"),
                _backend("b:2", healthy=False, health_detail="HTTP 503"),
                _backend("c:3", breaker={"state": "open", "opened_for_s": 4.2}),
                _backend("d:4", outlier={"ejected": True, "ejected_until_in_s": 7.5}),
                _backend("e:5", draining=True, slow_start=True, outlier={"ttfb_ewma_ms": None}),
            ],
        }
    },
    "routes": [
        {
            "name": "chat",
            "split": [{"pool": "stable", "weight": 9}, {"pool": "canary", "weight": 1}],
            "fallback": ["spare"],
            "sticky": "header:x-user-id",
        },
    ],
}


def test_render_state_is_a_kubectl_style_table() -> None:
    text = render_state(STATE)
    lines = text.splitlines()
    assert lines[0].startswith("gateway: ready")
    assert "last reload: FAILED" in lines[0]
    assert "/etc/llmproxy.yaml" in lines[0]
    assert "reload error: pools.x: bad" in text
    sections = [block.splitlines() for block in text.split("\n\n")]
    assert sections[1][1].split() == ["stable", "least_connections", "1/5", "1/10"]
    header, *backend_lines = sections[2]
    assert header.split() == list(BACKEND_COLUMNS)
    rows = {line.split()[1]: line.split() for line in backend_lines}
    assert list(rows) == ["a:1", "b:2", "c:3", "d:4", "e:5"]
    assert rows["a:1"][2:11] == ["up", "healthy", "closed", "no", "3", "2", "1.50", "12.3", "0"]
    assert rows["b:2"][2:4] == ["down", "unhealthy"]
    assert "HTTP 503" in " ".join(rows["b:2"])
    assert rows["c:3"][2] == "open"
    assert "breaker open 4s" in " ".join(rows["c:3"])
    assert rows["d:4"][2] == "ejected"
    assert rows["d:4"][5] == "7.5s"
    assert rows["e:5"][2] == "draining"
    assert rows["e:5"][9] == "-"
    assert "slow start; draining" in " ".join(rows["e:5"])
    # Columns line up: each row has its status, and its DETAIL, under the header's.
    for name, col in (("STATUS", 2), ("DETAIL", 11)):
        at = header.index(name)
        assert [line[at:].split()[0] for line in backend_lines] == [rows[n][col] for n in rows], (
            name
        )
    route = next(line for line in lines if line.startswith("chat"))
    assert route.split() == ["chat", "stable=90%,canary=10%", "spare", "header:x-user-id"]
    assert "\x1b[" not in text


def test_colour_wraps_only_the_status_and_keeps_columns() -> None:
    plain = render_state(STATE)
    coloured = render_state(STATE, colour=True)
    assert "\x1b[31;1mdown" in coloured
    stripped = coloured
    for code in ("\x1b[32m", "\x1b[31;1m", "\x1b[31m", "\x1b[33m", "\x1b[34m", "\x1b[0m"):
        stripped = stripped.replace(code, "")
    assert stripped == plain


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({}, "up"),
        ({"healthy": False, "breaker": {"state": "open"}, "draining": True}, "down"),
        ({"breaker": {"state": "open"}, "outlier": {"ejected": True}}, "open"),
        ({"outlier": {"ejected": True}, "breaker": {"state": "half_open"}}, "ejected"),
        ({"breaker": {"state": "half_open"}, "draining": True}, "half-open"),
        ({"draining": True}, "draining"),
    ],
)
def test_status_is_the_most_serious_condition(over: dict[str, Any], expected: str) -> None:
    assert backend_status(_backend("x", **over)) == expected


def test_watch_argument() -> None:
    assert parse().watch is None
    assert parse("--watch").watch == 2.0
    assert parse("--watch", "0.5").watch == 0.5
    with pytest.raises(SystemExit):
        parse("--watch", "0")


def test_status_of_a_real_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    up = Sim(tmp_path, name="up")
    down = Sim(tmp_path, "--unhealthy", name="down")
    cfg = pool_config(up.url, down.url, health=FAST_HEALTH)
    cfg["admin"] = {"token": TOKEN}
    gw = Gateway(tmp_path, cfg)
    try:

        def table() -> str | None:
            rc, out, err = run("--admin", gw.admin_url, "--token", TOKEN)
            assert rc == 0, err
            return out if " down " in out else None

        out = wait_for(table, what="the unhealthy backend shown down")
        rows = {line.split()[1]: line.split() for line in out.splitlines()
                if line.startswith("main ")}  # fmt: skip
        assert rows[up.url.removeprefix("http://")][2:4] == ["up", "healthy"]
        assert rows[down.url.removeprefix("http://")][2:4] == ["down", "unhealthy"]
        assert "HTTP 503" in out
        assert out.splitlines()[0].startswith("gateway: ready")

        rc, out, err = run("--admin", gw.admin_url, "--token", "wrong")
        assert (rc, out) == (1, "")
        assert "401" in err
        assert "wrong admin token" in err
        assert "Traceback" not in err

        monkeypatch.delenv("LLMPROXY_ADMIN_TOKEN", raising=False)
        rc, _, err = run("--admin", gw.admin_url)
        assert rc == 1
        assert "401" in err
        assert "LLMPROXY_ADMIN_TOKEN" in err

        # The token from the environment, and an admin URL without a scheme.
        monkeypatch.setenv("LLMPROXY_ADMIN_TOKEN", TOKEN)
        rc, out, err = run("--admin", gw.admin_url.removeprefix("http://"))
        assert rc == 0, err
    finally:
        gw.stop()
        up.stop()
        down.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_admin_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    rc, out, err = run("--admin", url)
    assert (rc, out) == (1, "")
    assert err.startswith("llmproxy status: cannot reach the admin API at")
    assert err.count("\n") == 1


def test_watch_redraws_and_shows_a_gateway_that_went_away(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    gw = Gateway(tmp_path, pool_config(sim.url))
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:
            gw.stop()

    try:
        rc, out, err = run("--admin", gw.admin_url, "--watch", "0.25", iterations=3, sleep=sleep)
    finally:
        gw.stop()
        sim.stop()
    assert rc == 0, err
    assert pauses == [0.25, 0.25]
    frames = out.split(CLEAR)[1:]
    assert len(frames) == 3
    assert all(f.startswith(f"every 0.25s: {gw.admin_url}") for f in frames)
    assert "BACKEND" in frames[0]
    assert "BACKEND" in frames[1]
    assert "error: cannot reach the admin API" in frames[2]


def test_watch_ends_with_0_on_ctrl_c(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    gw = Gateway(tmp_path, pool_config(sim.url))
    script = (
        "import argparse, sys\n"
        "from llmproxy.admin.status_cli import add_status_arguments, run_status\n"
        "p = argparse.ArgumentParser()\n"
        "add_status_arguments(p)\n"
        "sys.exit(run_status(p.parse_args(sys.argv[1:])))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--admin", gw.admin_url, "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + 15
        while seen.count(b"BACKEND") < 2 and time.monotonic() < deadline:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            seen += chunk
        assert seen.count(b"BACKEND") >= 2, seen
        proc.send_signal(signal.SIGINT)
        _rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gw.stop()
        sim.stop()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
