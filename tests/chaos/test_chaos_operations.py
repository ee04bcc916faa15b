"""Chaos: what operators do to a running gateway under load.

Draining a backend, reloading the config (broken, then valid) with SIGHUP,
and SIGTERM while streams are flowing. Same setup as the replica scenarios:
real processes, 16 concurrent clients, bounded windows and polls.
"""

from __future__ import annotations

import signal
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chaos.conftest import Cluster, admin, backend, backend_name, chaos_config, metric
from tests.chaos.load import Load, Shape, summary
from tests.support import http, wait_for

pytestmark = pytest.mark.chaos


def test_drain_and_undrain_one_backend(cluster: Cluster) -> None:
    sims = cluster.sims(3)
    drained, name = sims[0], backend_name(sims[0])
    gw = cluster.gateway(chaos_config(*(s.url for s in sims)))
    with Load(gw.url, client="aiohttp") as load:
        load.window(1.0)
        status, body = admin(gw, "POST", f"/admin/backends/main/{name}/drain")
        assert status == 200, body
        t_drain = time.monotonic()  # the drain is in effect once the call returns
        assert body["draining"] is True
        state = backend(gw, name)
        assert state["draining"], state
        assert not state["available"], state
        wait_for(lambda: backend(gw, name)["in_flight"] == 0, 5, what="drained backend idle")
        reached = drained.stats()["requests"]
        load.window(1.0)
        reached_later = drained.stats()["requests"]
        t_undrain_call = time.monotonic()
        status, body = admin(gw, "POST", f"/admin/backends/main/{name}/undrain")
        assert status == 200, body
        t_undrain = time.monotonic()
        wait_for(lambda: any(r.backend == name for r in load.since(t_undrain)), 3,
                 what="traffic on the undrained backend")  # fmt: skip
        load.window(0.3)
    records = load.stop()
    report = summary(records, t_drain)
    print(report)

    # Nothing fails: in-flight requests on the drained backend finish intact.
    assert all(r.ok for r in records), report
    finishing = [r for r in records if r.backend == name and r.in_flight_at(t_drain)]
    assert finishing, f"nothing was in flight on it at the drain\n{report}"
    # No new request while drained, on the replica side (exact) and the client
    # side; the client window ends 0.25 s before the undrain call, the lag
    # a loaded runner may put between stamping a request and sending it.
    drained_window = [r for r in records if t_drain <= r.started < t_undrain_call - 0.25]
    assert drained_window, report
    assert all(r.backend != name for r in drained_window), summary(drained_window, t_drain)
    assert reached_later == reached, (reached, reached_later)
    assert not backend(gw, name)["draining"]


def _write_config(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg))


def test_sighup_broken_then_valid_config(cluster: Cluster) -> None:
    sims = cluster.sims(2)
    # The replica to add is down (its /health fails) when it is added: it
    # must take traffic only once it passes its health checks.
    extra = cluster.sim("--unhealthy", name="sim-extra")
    extra_name = backend_name(extra)
    cfg = chaos_config(*(s.url for s in sims))
    gw = cluster.gateway(cfg)
    before = gw.state()["pools"]

    def names() -> list[str]:
        return [b["name"] for b in gw.state()["pools"]["main"]["backends"]]

    with Load(gw.url, client="openai") as load:
        load.window(0.8)
        gw.config_path.write_text("pools:\n  main: {backends: [http://127.0.0.1:1\nroutes: [\n")
        gw.signal(signal.SIGHUP)
        wait_for(lambda: gw.state()["last_reload"]["ok"] is False, 5, what="failed reload seen")
        state = gw.state()
        assert state["last_reload"]["errors"], state["last_reload"]
        text = gw.metrics()
        assert metric(text, "llmproxy_config_last_reload_successful") == 0
        assert metric(text, "llmproxy_config_reloads_total", result="error") >= 1
        # The running config is untouched.
        assert [b["name"] for b in state["pools"]["main"]["backends"]] == [
            b["name"] for b in before["main"]["backends"]
        ]
        status, body = admin(gw, "POST", "/admin/reload")
        assert status == 422, body
        assert body["errors"], body
        load.window(0.8)

        cfg["pools"]["main"]["backends"].append({"url": extra.url})
        _write_config(gw.config_path, cfg)
        gw.signal(signal.SIGHUP)
        wait_for(lambda: extra_name in names(), 5, what="added backend in the state")
        t_added = time.monotonic()
        state = gw.state()
        assert state["last_reload"]["ok"] is True, state["last_reload"]
        assert metric(gw.metrics(), "llmproxy_config_last_reload_successful") == 1
        # Checked, not used, while its /health fails (0.8 s = 4 intervals).
        load.window(0.8)
        assert not backend(gw, extra_name)["healthy"]
        assert extra.stats()["health_checks"] >= 2
        early = extra.stats()["requests"]
        assert early == 0, f"the added backend took {early} requests before passing a check"
        t_healthy = time.monotonic()
        extra.faults(unhealthy=False)
        wait_for(lambda: backend(gw, extra_name)["healthy"], 5, what="added backend healthy")
        wait_for(lambda: any(r.backend == extra_name for r in load.since(t_healthy)), 5,
                 what="traffic on the added backend")  # fmt: skip
        load.window(0.3)
    records = load.stop()
    report = summary(records, t_added)
    print(report)

    assert all(r.ok for r in records), report
    assert not [r for r in records if r.backend == extra_name and r.started < t_healthy], report
    assert extra.stats()["requests"] > 0


def _sigterm_shape(worker: int) -> tuple[bool, int]:
    """12 short streams (~0.31 s), 2 long ones (~6 s, past the drain), 2 non-streamed."""
    if worker < 12:
        return True, 30
    if worker < 14:
        return True, 600
    return False, 10


def test_sigterm_under_streaming_load(cluster: Cluster) -> None:
    drain_timeout_s = 2.0
    sims = cluster.sims(3)
    cfg = chaos_config(
        *(s.url for s in sims),
        timeouts={"idle_s": 5.0},
        server={"drain_timeout_s": drain_timeout_s},
    )
    gw = cluster.gateway(cfg)
    shape: Shape = _sigterm_shape

    def readyz() -> int | None:
        try:
            return http("GET", f"{gw.admin_url}/readyz", timeout=1.0)[0]
        except (urllib.error.URLError, OSError):
            return None

    assert readyz() == 200
    with Load(gw.url, client="aiohttp", shape=shape) as load:
        load.window(1.0)
        # Clients stop starting requests (no keep-alive race with the close);
        # those in flight are what the drain is about.
        load.stop_issuing()
        t_term = time.monotonic()
        gw.signal(signal.SIGTERM)
        wait_for(lambda: readyz() == 503, 1.0, interval=0.01, what="/readyz 503 after SIGTERM")
        t_unready = time.monotonic()
        # A new client is not served (refused, or a 503).
        try:
            fresh = http("POST", f"{gw.url}/v1/chat/completions",
                         {"model": "sim-model", "messages": [{"role": "user", "content": "x"}],
                          "max_tokens": 2}, timeout=2.0)[0]  # fmt: skip
        except (urllib.error.URLError, OSError):
            fresh = None
        code = gw.popen.wait(timeout=drain_timeout_s + 5)
        t_exit = time.monotonic()
    records = load.stop()
    report = summary(records, t_term)
    print(report)

    print(f"unready after {t_unready - t_term:.3f}s, exit {code} after {t_exit - t_term:.3f}s")
    assert code == 0, gw.log()
    assert t_unready - t_term < 0.5, t_unready - t_term
    assert fresh in (None, 503), fresh
    # Exit once the drain is over: 2 s drain + 1.5 s to close and exit.
    assert t_exit - t_term < drain_timeout_s + 1.5, t_exit - t_term

    assert all(r.ok for r in records if r.ended < t_term), report
    in_flight = [r for r in records if r.in_flight_at(t_term)]
    short = [r for r in in_flight if r.stream and r.max_tokens == 30]
    long_ = [r for r in in_flight if r.stream and r.max_tokens == 600]
    assert len(short) >= 6, report
    assert len(long_) == 2, report
    # Every stream that can finish within the drain timeout finishes intact:
    # [DONE] received and every token.
    for r in short + [r for r in in_flight if not r.stream]:
        assert r.ok, r.brief(t_term)
        assert r.done, r.brief(t_term)
    # The rest end with the SSE error event when the drain time is up.
    for r in long_:
        assert r.outcome == "sse_error", r.brief(t_term)
        assert r.ended - t_term < drain_timeout_s + 1.0, r.brief(t_term)
