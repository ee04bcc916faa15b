"""Shared by the Locust run scripts: loopback processes, a Locust run, its statistics.

Everything here is stdlib plus PyYAML (a dependency of llmproxy). Locust runs
as a child process: its gevent monkey-patching must not reach this process,
nor the asyncio gateway and replicas, which are child processes too. Every
server starts on port 0 and announces its URL on stdout, so nothing races for
a "free" port; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"
PROFILES = HERE / "profiles"
RESULTS = HERE / "results"
#: Rows of real requests in Locust's statistics; the others are custom metrics.
REQUEST_ROWS = (("POST", "chat"), ("POST", "chat-stream"))
TTFT_ROW = ("TTFT", "chat-stream")
TPS_ROW = ("TPS", "chat-stream")
#: Failure kinds, as the locustfile prefixes its failure messages.
FAILURE_KINDS = ("pre-first-byte", "sse-error-event", "truncated", "bad-response")


class HarnessError(RuntimeError):
    """A process did not start, or Locust did not produce its statistics."""


class Child:
    """A child process whose first stdout line containing ``marker`` gives its URL."""

    def __init__(self, args: Sequence[str], marker: str, log: Path, timeout: float = 20.0) -> None:
        self.args = list(args)
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(log, "ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, *self.args],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env,
                text=True,
            )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while marker not in (line := self._next_line(lines, deadline)):
            pass
        self.banner = line.strip()
        self.url = self.banner.split(marker, 1)[1].split()[0]

    def _pump(self, lines: queue.Queue[str]) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            lines.put(line)

    def _next_line(self, lines: queue.Queue[str], deadline: float) -> str:
        while (remaining := deadline - time.monotonic()) > 0 and self.popen.poll() is None:
            with contextlib.suppress(queue.Empty):
                return lines.get(timeout=min(remaining, 0.2))
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise HarnessError(f"{' '.join(self.args)} did not start:\n{tail}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to close its connections."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    """Simulated replicas and one gateway on loopback; all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.stop()

    def sim(self, name: str, sim_args: Sequence[str], port: int = 0) -> Child:
        args = ["-m", "llmproxy.sim", "--port", str(port), *sim_args]
        child = Child(args, "listening on ", self.workdir / f"{name}.log")
        self.children.append(child)
        return child

    def sims(self, count: int, sim_args: Sequence[str]) -> list[Child]:
        """``count`` replicas, started side by side (a start is mostly imports)."""
        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(lambda i: self.sim(f"sim{i}", sim_args), range(count)))

    def gateway(self, urls: Sequence[str], pool: dict[str, Any] | None = None) -> Child:
        config = {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "pools": {"main": {"backends": [{"url": u} for u in urls], **(pool or {})}},
            "routes": [{"name": "all", "match": {"model": "*"}, "pool": "main"}],
        }
        path = self.workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        args = ["-m", "llmproxy", "serve", "--config", str(path)]
        child = Child(args, "listening on ", self.workdir / "gateway.log")
        self.children.append(child)
        return child


def sim_stats(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """The replica's own counters (``GET /sim/stats``)."""
    with urllib.request.urlopen(f"{url}/sim/stats", timeout=timeout) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def sim_requests(url: str) -> int:
    """Requests the replica has received; 0 when it does not answer."""
    try:
        return int(sim_stats(url)["requests"])
    except (OSError, ValueError, KeyError):
        return 0


def locust_command(
    host: str, profile: Path, csv_prefix: Path, extra: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--config",
        str(profile),
        "--host",
        host,
        "--headless",
        "--only-summary",
        "--csv",
        str(csv_prefix),
        *extra,
    ]


@contextlib.contextmanager
def running_locust(command: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Locust as a child process (summary table and log to ``log``); killed if still running."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
        )
    try:
        yield popen
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def wait_locust(popen: subprocess.Popen[bytes], timeout: float) -> int:
    """Locust's exit code; SIGKILL and :class:`HarnessError` past ``timeout``."""
    try:
        return popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
        raise HarnessError(f"locust did not finish within {timeout:.0f}s") from None


@dataclass(frozen=True, slots=True)
class Row:
    """One row of Locust's ``*_stats.csv``; times in ms (TPS rows: tokens/s)."""

    kind: str
    name: str
    count: int
    failures: int
    median: float
    average: float
    p95: float
    p99: float
    maximum: float

    def brief(self) -> str:
        return (
            f"{self.kind:5} {self.name:12} n={self.count:<6} fail={self.failures:<4} "
            f"median={self.median:.0f} avg={self.average:.1f} p95={self.p95:.0f} "
            f"p99={self.p99:.0f} max={self.maximum:.0f}"
        )


@dataclass(slots=True)
class Stats:
    """What a Locust run left in its CSV files."""

    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    #: (method, name, error message) -> occurrences
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: Unhandled exceptions in the locustfile: (message, count).
    exceptions: list[tuple[str, int]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.rows[r].count for r in REQUEST_ROWS if r in self.rows)

    @property
    def failed(self) -> int:
        return sum(self.rows[r].failures for r in REQUEST_ROWS if r in self.rows)

    def row(self, key: tuple[str, str]) -> Row | None:
        return self.rows.get(key)

    def failure_kinds(self) -> Counter[str]:
        """Failed requests by kind (the prefix of their message); unknown ones as ``other``."""
        kinds: Counter[str] = Counter()
        for (_, _, error), occurrences in self.failures.items():
            kind = next((k for k in FAILURE_KINDS if f"{k}: " in error), "other")
            kinds[kind] += occurrences
        return kinds

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failed": self.failed,
            "rows": {f"{k} {n}": vars_of(row) for (k, n), row in self.rows.items()},
            "failure_kinds": dict(self.failure_kinds()),
            "failures": [
                {"method": m, "name": n, "error": e, "occurrences": c}
                for (m, n, e), c in self.failures.items()
            ],
            "exceptions": [{"message": m, "count": c} for m, c in self.exceptions],
        }


def vars_of(row: Row | None) -> dict[str, Any] | None:
    return None if row is None else {f.name: getattr(row, f.name) for f in fields(Row)}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "N/A" when a row has no sample
        return 0.0


def read_stats(csv_prefix: Path) -> Stats:
    """Parse ``PREFIX_stats.csv``, ``PREFIX_failures.csv`` and ``PREFIX_exceptions.csv``."""
    stats_path = Path(f"{csv_prefix}_stats.csv")
    if not stats_path.exists():
        raise HarnessError(f"locust wrote no statistics ({stats_path} is missing)")
    stats = Stats()
    with open(stats_path, newline="") as f:
        for rec in csv.DictReader(f):
            if rec["Name"] == "Aggregated":
                continue
            row = Row(
                kind=rec["Type"],
                name=rec["Name"],
                count=int(rec["Request Count"]),
                failures=int(rec["Failure Count"]),
                median=_number(rec["Median Response Time"]),
                average=_number(rec["Average Response Time"]),
                p95=_number(rec["95%"]),
                p99=_number(rec["99%"]),
                maximum=_number(rec["Max Response Time"]),
            )
            stats.rows[(row.kind, row.name)] = row
    with (
        contextlib.suppress(FileNotFoundError),
        open(f"{csv_prefix}_failures.csv", newline="") as f,
    ):
        for rec in csv.DictReader(f):
            key = (rec["Method"], rec["Name"], rec["Error"])
            stats.failures[key] = stats.failures.get(key, 0) + int(rec["Occurrences"])
    with (
        contextlib.suppress(FileNotFoundError),
        open(f"{csv_prefix}_exceptions.csv", newline="") as f,
    ):
        stats.exceptions = [(rec["Message"], int(rec["Count"])) for rec in csv.DictReader(f)]
    return stats


def format_stats(stats: Stats) -> str:
    lines = [row.brief() for row in stats.rows.values()]
    lines.append(
        "  (TTFT: ms from request to first content token; TPS: tokens/s of each stream; "
        "POST: ms per request)"
    )
    for (method, name, error), count in stats.failures.items():
        lines.append(f"  failure x{count}: {method} {name}: {error}")
    for message, count in stats.exceptions:
        lines.append(f"  locustfile exception x{count}: {message}")
    return "\n".join(lines)


@dataclass(slots=True)
class Verdict:
    """Named checks of a run; it passes when every check does."""

    checks: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, ok))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)

    def report(self) -> str:
        lines = [f"  [{'ok' if ok else 'FAIL'}] {what}" for what, ok in self.checks]
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def results_dir(name: str, out: Path | None) -> Path:
    """``out``, or ``loadtests/results/NAME`` (ignored by git); created."""
    path = out or RESULTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(summary, indent=2))


def add_common_arguments(parser: argparse.ArgumentParser, profile: str, seconds: int) -> None:
    add = parser.add_argument
    add("--profile", type=Path, default=PROFILES / profile, help="Locust config file (%(default)s)")
    add("--seconds", type=int, default=seconds, help="Locust run time, s (%(default)s)")
    add("--out", type=Path, default=None, help="directory for logs and CSV (loadtests/results/…)")
    add("--summary-json", type=Path, default=None, help="write the summary here as JSON")
    add("locust_args", nargs="*", help="more Locust options, after --  (e.g. -- -u 16)")


def locust_timeout(seconds: int) -> float:
    """Bound on a whole Locust run: start-up, run time, stop timeout, CSV writing."""
    return seconds + 60.0


def exit_on_sigterm() -> None:
    """Make SIGTERM a SystemExit, so ``finally`` blocks stop the child processes."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
