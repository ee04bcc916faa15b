"""Real processes on loopback for integration and chaos tests.

Every server here is started on port 0 and announces the port it got on
stdout, so tests never race for a "free" port. Waits poll with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or condition} (last: {last!r})"
    )


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """A plain blocking HTTP call (stdlib), for control and state endpoints."""
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    status, _, body = http("GET", url, headers=headers)
    assert status == 200, (url, status, body)
    return json.loads(body)


class Proc:
    """A child process whose first stdout line matching ``marker`` gives its URL(s)."""

    def __init__(self, args: list[str], marker: str, log_path: Path, timeout: float = 15.0) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.popen.poll() is not None:
                self.stop()
                log = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{args} did not start: {log}")
            try:
                line = self._lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            if marker in line:
                self.banner = line.strip()
                break

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.popen.returncode


class Sim(Proc):
    def __init__(self, tmp: Path, *args: str, name: str = "sim") -> None:
        self.cli_args = list(args)
        super().__init__(
            ["-m", "llmproxy.sim", "--port", "0", *args], "listening on", tmp / f"{name}.log"
        )
        self.url = self.banner.split("listening on ", 1)[1].split()[0]

    def stats(self) -> dict[str, Any]:
        return get_json(f"{self.url}/sim/stats")  # type: ignore[no-any-return]

    def faults(self, **faults: Any) -> dict[str, Any]:
        status, _, body = http("POST", f"{self.url}/sim/faults", faults)
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]


class Gateway(Proc):
    def __init__(self, tmp: Path, config: dict[str, Any], name: str = "gateway") -> None:
        config = dict(config)
        config.setdefault("server", {}).setdefault("port", 0)
        config["server"].setdefault("host", "127.0.0.1")
        config.setdefault("admin", {}).setdefault("port", 0)
        config["admin"].setdefault("host", "127.0.0.1")
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__(
            ["-m", "llmproxy", "serve", "--config", str(self.config_path)],
            "listening on",
            tmp / f"{name}.log",
        )
        # "llmproxy listening on http://h:p (admin: http://h:p)"
        self.url = self.banner.split("listening on ", 1)[1].split()[0]
        self.admin_url = self.banner.split("(admin: ", 1)[1].rstrip(")")

    def state(self, token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return get_json(f"{self.admin_url}/admin/state", headers)  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return http("GET", f"{self.admin_url}/metrics")[2].decode()

    def in_flight(self) -> int:
        return sum(b["in_flight"] for p in self.state()["pools"].values() for b in p["backends"])


def pool_config(*urls: str, **pool: Any) -> dict[str, Any]:
    """A one-pool, catch-all-route config for the given backend URLs."""
    return {
        "pools": {"main": {"backends": [{"url": u} for u in urls], **pool}},
        "routes": [{"name": "all", "match": {"model": "*"}, "pool": "main"}],
    }


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()
