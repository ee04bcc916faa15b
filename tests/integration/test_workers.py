"""server.workers: N processes on one port; one admin view of the whole gateway."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tests.support import Gateway, Sim, get_json, http, pool_config, wait_for

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def total_requests(metrics: str) -> float:
    return sum(
        float(m.group(1))
        for m in re.finditer(
            r'^llmproxy_requests_total\{[^}]*code="200"[^}]*\} (\S+)$', metrics, re.M
        )
    )


def test_two_workers_share_the_port_and_the_admin_view(tmp_path: Path) -> None:
    sim = Sim(tmp_path, "--model", "m", "--ttft-ms", "0", "--tokens-per-s", "0")
    cfg = pool_config(sim.url)
    cfg["server"] = {"workers": 2}
    gw = Gateway(tmp_path, cfg)
    try:
        state = gw.state()
        workers = state["workers"]
        assert len(workers) == 2
        assert all(w["admin_url"] for w in workers)
        # New connection per request: the kernel spreads them over both workers.
        for _ in range(120):
            status, _, _ = http("POST", f"{gw.url}/v1/chat/completions", BODY,
                                headers={"Connection": "close"})  # fmt: skip
            assert status == 200
        per_worker = [total_requests(http("GET", f"{w['admin_url']}/metrics")[2].decode())
                      for w in workers]  # fmt: skip
        assert all(n > 0 for n in per_worker), per_worker
        assert total_requests(gw.metrics()) == sum(per_worker) == 120
        backends = gw.state()["pools"]["main"]["backends"]
        assert backends[0]["in_flight"] == 0
        # Operator actions reach every worker.
        name = sim.url.removeprefix("http://")
        st, _, _ = http("POST", f"{gw.admin_url}/admin/backends/main/{name}/drain")
        assert st == 200
        for w in workers:
            ws = get_json(f"{w['admin_url']}/admin/state")
            assert ws["pools"]["main"]["backends"][0]["draining"] is True
        # A worker that dies is replaced.
        os.kill(workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: gw.state()["workers"][0]["restarts"] == 1, timeout=15, what="restart")
        wait_for(lambda: gw.state()["workers"][0]["admin_url"] is not None, timeout=15)
    finally:
        assert gw.stop() == 0, gw.log()
        sim.stop()
