"""Failure handling end to end, one behaviour at a time (the chaos suite runs
them under load): no eligible backend, panic routing, fallback, breaker,
drain, hot reload, graceful shutdown, the admin token."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support import Gateway, Sim, http, pool_config, wait_for

MODEL = "sim-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 0.5, "healthy_threshold": 1,
               "unhealthy_threshold": 1, "jitter": 0}  # fmt: skip


def chat(gw: Gateway, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    return http("POST", f"{gw.url}/v1/chat/completions", body or BODY)


def backend_state(gw: Gateway, name: str) -> dict[str, Any]:
    for pool in gw.state()["pools"].values():
        for b in pool["backends"]:
            if b["name"] == name:
                return b  # type: ignore[no-any-return]
    raise KeyError(name)


def name_of(sim: Sim) -> str:
    return sim.url.removeprefix("http://")


def test_no_eligible_backend_is_a_fast_503_with_retry_after(tmp_path: Path) -> None:
    sims = [Sim(tmp_path, "--unhealthy", name=f"s{i}") for i in range(2)]
    gw = Gateway(tmp_path, pool_config(*(s.url for s in sims), health=FAST_HEALTH))
    try:
        wait_for(lambda: gw.state()["pools"]["main"]["eligible"] == 0, what="both unhealthy")
        t0 = time.monotonic()
        status, headers, body = chat(gw)
        assert time.monotonic() - t0 < 1.0
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["code"] == "no_healthy_upstream"
        assert all(s.stats()["requests"] == 0 for s in sims)  # refused, not tried
        assert http("GET", f"{gw.url}/readyz")[0] == 503
    finally:
        gw.stop()
        for s in sims:
            s.stop()


def test_panic_mode_tries_a_backend_anyway(tmp_path: Path) -> None:
    sim = Sim(tmp_path, "--unhealthy")
    gw = Gateway(tmp_path, pool_config(sim.url, health=FAST_HEALTH, panic_mode=True))
    try:
        wait_for(lambda: not backend_state(gw, name_of(sim))["healthy"], what="unhealthy")
        status, _, _ = chat(gw)
        assert status == 200
        assert 'action="panic"' in gw.metrics()
    finally:
        gw.stop()
        sim.stop()


def test_route_falls_back_to_another_pool(tmp_path: Path) -> None:
    down = Sim(tmp_path, "--unhealthy", name="down")
    spare = Sim(tmp_path, name="spare")
    cfg = {
        "pools": {
            "primary": {"backends": [down.url], "health": FAST_HEALTH},
            "spare": {"backends": [spare.url], "health": FAST_HEALTH},
        },
        "routes": [
            {"name": "all", "match": {"model": "*"}, "pool": "primary", "fallback": ["spare"]}
        ],
    }
    gw = Gateway(tmp_path, cfg)
    try:
        wait_for(lambda: gw.state()["pools"]["primary"]["eligible"] == 0, what="primary down")
        status, headers, _ = chat(gw)
        assert status == 200
        assert headers["x-llmproxy-pool"] == "spare"
        assert down.stats()["requests"] == 0
    finally:
        gw.stop()
        down.stop()
        spare.stop()


def test_breaker_opens_on_5xx_and_closes_after_a_good_probe(tmp_path: Path) -> None:
    sim = Sim(tmp_path, "--error-rate", "1", "--error-status", "500")
    cfg = pool_config(
        sim.url,
        breaker={"failure_threshold": 2, "reset_timeout_s": 0.3, "half_open_max_calls": 1},
        outlier={"enabled": False},
        health={"enabled": False},
    )
    gw = Gateway(tmp_path, cfg)
    try:
        assert chat(gw)[0] == 500  # a 500 is passed on, not retried...
        assert chat(gw)[0] == 500  # ...but it counts against the breaker
        assert backend_state(gw, name_of(sim))["breaker"]["state"] == "open"
        status, headers, _ = chat(gw)
        assert status == 503
        assert "Retry-After" in headers
        assert sim.stats()["requests"] == 2
        assert 'llmproxy_breaker_state{backend="' in gw.metrics()
        sim.faults(error_rate=0)
        # After reset_timeout_s one probe is admitted; its success closes the breaker.
        wait_for(lambda: chat(gw)[0] == 200, what="probe admitted", interval=0.1)
        assert backend_state(gw, name_of(sim))["breaker"]["state"] == "closed"
    finally:
        gw.stop()
        sim.stop()


async def test_drain_one_backend(tmp_path: Path) -> None:
    slow = Sim(tmp_path, "--ttft-ms", "0", "--tokens-per-s", "20", name="a")
    other = Sim(tmp_path, name="b")
    gw = Gateway(tmp_path, pool_config(slow.url, other.url, balancer="round_robin"))
    a = name_of(slow)
    try:
        async with aiohttp.ClientSession() as s:
            # A stream in flight on backend a (round robin: try until it lands there).
            for _ in range(4):
                r = await s.post(
                    f"{gw.url}/v1/chat/completions",
                    json={**BODY, "stream": True, "max_tokens": 10},
                )
                if r.headers["x-llmproxy-backend"] == a:
                    break
                await r.read()
            assert r.headers["x-llmproxy-backend"] == a
            st, _, body = http("POST", f"{gw.admin_url}/admin/backends/main/{a}/drain")
            assert st == 200
            assert json.loads(body)["draining"] is True
            for _ in range(6):
                assert chat(gw)[1]["x-llmproxy-backend"] != a
            text = (await r.read()).decode()  # the in-flight stream finishes intact
            assert text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in text
        st, _, _ = http("POST", f"{gw.admin_url}/admin/backends/main/{a}/undrain")
        assert st == 200
        wait_for(lambda: chat(gw)[1]["x-llmproxy-backend"] == a, what="traffic back on a")
        st, _, body = http("POST", f"{gw.admin_url}/admin/backends/main/nope/drain")
        assert st == 404
        assert "error" in json.loads(body)
    finally:
        gw.stop()
        slow.stop()
        other.stop()


def test_hot_reload_rejects_broken_file_and_applies_a_valid_one(tmp_path: Path) -> None:
    one = Sim(tmp_path, name="one")
    two = Sim(tmp_path, name="two")
    cfg = pool_config(one.url, health=FAST_HEALTH, balancer="round_robin")
    gw = Gateway(tmp_path, cfg)
    try:
        assert chat(gw)[0] == 200
        gw.config_path.write_text("pools: [this is: not valid")
        st, _, body = http("POST", f"{gw.admin_url}/admin/reload")
        assert st == 422
        assert json.loads(body)["errors"]
        state = gw.state()
        assert state["last_reload"]["ok"] is False
        assert [b["name"] for b in state["pools"]["main"]["backends"]] == [name_of(one)]
        assert "llmproxy_config_last_reload_successful 0.0" in gw.metrics()
        assert chat(gw)[0] == 200

        cfg["pools"]["main"]["backends"] = [{"url": one.url}, {"url": two.url}]
        gw.config_path.write_text(yaml.safe_dump(cfg_with_ports(gw, cfg)))
        gw.signal(signal.SIGHUP)
        wait_for(lambda: len(gw.state()["pools"]["main"]["backends"]) == 2, what="reloaded")
        assert gw.state()["last_reload"]["ok"] is True
        served = {chat(gw)[1]["x-llmproxy-backend"] for _ in range(6)}
        assert served == {name_of(one), name_of(two)}
    finally:
        gw.stop()
        one.stop()
        two.stop()


def cfg_with_ports(gw: Gateway, cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as the running gateway has it (its listeners' real ports)."""
    port = int(gw.url.rsplit(":", 1)[1])
    admin_port = int(gw.admin_url.rsplit(":", 1)[1])
    return {
        **cfg,
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
    }


async def test_sigterm_drains_then_ends_open_streams_visibly(tmp_path: Path) -> None:
    sim = Sim(tmp_path, "--ttft-ms", "0", "--tokens-per-s", "10")
    cfg = pool_config(sim.url)
    cfg["server"] = {"drain_timeout_s": 1.0}
    gw = Gateway(tmp_path, cfg)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{gw.url}/v1/chat/completions"
            short = await s.post(url, json={**BODY, "stream": True, "max_tokens": 4})
            long = await s.post(url, json={**BODY, "stream": True, "max_tokens": 200})
            assert short.status == long.status == 200
            t0 = time.monotonic()
            gw.signal(signal.SIGTERM)
            wait_for(lambda: http("GET", f"{gw.admin_url}/readyz")[0] == 503, what="not ready")
            short_text, long_text = await asyncio.gather(short.text(), long.text())
            assert short_text.rstrip().endswith("data: [DONE]")
            last = long_text.strip().split("\n\n")[-1]
            assert json.loads(last.removeprefix("data: "))["error"]["message"]
            assert time.monotonic() - t0 < 5
        assert gw.popen.wait(timeout=10) == 0
    finally:
        gw.stop()
        sim.stop()


def test_admin_token_is_required_when_set(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    cfg = pool_config(sim.url)
    cfg["admin"] = {"token": "s3cret"}
    gw = Gateway(tmp_path, cfg)
    try:
        for method, path in [
            ("GET", "/admin/state"),
            ("POST", "/admin/reload"),
            ("POST", f"/admin/backends/main/{name_of(sim)}/drain"),
        ]:
            st, _headers, body = http(method, f"{gw.admin_url}{path}")
            assert st == 401, path
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
            st, _, _ = http(method, f"{gw.admin_url}{path}",
                            headers={"Authorization": "Bearer wrong"})  # fmt: skip
            assert st == 401
        assert gw.state(token="s3cret")["ready"] is True
        assert http("GET", f"{gw.admin_url}/metrics")[0] == 200  # scrapes stay open
    finally:
        gw.stop()
        sim.stop()


def test_killed_backend_is_retried_and_marked_down(tmp_path: Path) -> None:
    a = Sim(tmp_path, name="a")
    b = Sim(tmp_path, name="b")
    gw = Gateway(tmp_path, pool_config(a.url, b.url, health=FAST_HEALTH, balancer="round_robin"))
    try:
        a.kill()
        for _ in range(6):
            status, headers, _ = chat(gw)
            assert status == 200
            assert headers["x-llmproxy-backend"] == name_of(b)
        wait_for(lambda: not backend_state(gw, name_of(a))["healthy"], what="a marked down")
        assert 'to="down"' in gw.metrics()
    finally:
        gw.stop()
        a.stop()
        b.stop()
