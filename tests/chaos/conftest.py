"""Shared pieces of the chaos suite: real processes, a chaos-tuned pool, metrics.

Every process a test starts goes through the ``cluster`` fixture, which stops
them all in teardown (also when the test fails) and, on failure, prints the
tail of each process's log so the report shows what the gateway did.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.load import MODEL
from tests.support import Gateway, Proc, Sim, http, pool_config

#: A realistic small replica: 20 ms to first token, 100 tokens/s. A 30-token
#: stream takes ~0.31 s, a 10-token completion ~0.11 s.
SIM_ARGS = ("--model", MODEL, "--ttft-ms", "20", "--tokens-per-s", "100")

#: Pool settings tuned so that failures are noticed within a second or two,
#: which keeps every scenario bounded. Scenarios override single keys.
CHAOS_POOL: dict[str, Any] = {
    "balancer": "least_connections",
    "health": {
        "interval_s": 0.2,
        "timeout_s": 0.5,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
        "jitter": 0.1,
    },
    "breaker": {"failure_threshold": 3, "reset_timeout_s": 1.0, "half_open_max_calls": 1},
    "retry": {
        "attempts": 3,
        "budget_ratio": 0.2,
        "min_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "budget_window_s": 10.0,
    },
    "timeouts": {"connect_s": 0.5, "first_byte_s": 2.0, "idle_s": 2.0, "total_s": 30.0},
    "outlier": {"consecutive_failures": 5, "base_ejection_s": 1.0, "max_ejection_s": 5.0},
    "slow_start_s": 0.0,
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chaos_config(*urls: str, **pool: Any) -> dict[str, Any]:
    """One pool ``main`` of ``urls`` with :data:`CHAOS_POOL`, sections merged key by key."""
    server = pool.pop("server", None)
    cfg = pool_config(*urls, **_merge(CHAOS_POOL, pool))
    if server is not None:
        cfg["server"] = server
    return cfg


def backend_name(sim: Sim) -> str:
    """The default backend name: ``host:port`` of the URL."""
    return sim.url.removeprefix("http://")


def port_of(sim: Sim) -> int:
    return int(sim.url.rsplit(":", 1)[1])


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def backend(gw: Gateway, name: str, pool: str = "main") -> dict[str, Any]:
    """One backend's entry in the admin state."""
    for b in gw.state()["pools"][pool]["backends"]:
        if b["name"] == name:
            return b  # type: ignore[no-any-return]
    raise AssertionError(f"backend {name} not in the admin state of pool {pool}")


def admin(gw: Gateway, method: str, path: str) -> tuple[int, Any]:
    status, _, body = http(method, f"{gw.admin_url}{path}")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class Cluster:
    """The processes of one test; all stopped in teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def sim(self, *args: str, name: str) -> Sim:
        s = Sim(self.tmp, *SIM_ARGS, *args, name=name)
        self.procs.append(s)
        return s

    def sims(self, count: int = 3, *args: str) -> list[Sim]:
        """``count`` replicas started in parallel (each start is mostly imports)."""
        with ThreadPoolExecutor(count) as pool:
            started = list(pool.map(lambda i: Sim(self.tmp, *SIM_ARGS, *args, name=f"sim{i}"),
                                    range(count)))  # fmt: skip
        self.procs.extend(started)
        return started

    def restart(self, dead: Sim, *args: str, name: str) -> Sim:
        """A new replica on the port of ``dead`` (argparse keeps the last --port)."""
        s = self.sim(*args, "--port", str(port_of(dead)), name=name)
        assert s.url == dead.url, (s.url, dead.url)
        return s

    def gateway(self, cfg: dict[str, Any], name: str = "gateway") -> Gateway:
        gw = Gateway(self.tmp, cfg, name=name)
        self.procs.append(gw)
        return gw

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {p.args}: {exc!r}")

    def dump_logs(self) -> None:
        for p in self.procs:
            if isinstance(p, Gateway):
                tail = p.log_path.read_text(errors="replace")[-6000:]
                print(f"===== {p.log_path.name} (tail) =====\n{tail}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"chaos_{report.when}", report)
    return report


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        report = getattr(request.node, "chaos_call", None)
        if report is not None and report.failed:
            c.dump_logs()
