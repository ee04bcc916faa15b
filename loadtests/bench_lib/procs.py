"""Child processes of the benchmark: started pinned to a core, always stopped.

Every process the benchmark starts goes through :class:`Processes`, a context
manager whose exit stops whatever is still running (SIGTERM, then SIGKILL after
a grace period), whether the block ended normally, by an exception or by
Ctrl-C. Children stay in the benchmark's process group, so a Ctrl-C typed in
the terminal reaches them too.

Pinning uses ``taskset -c CORE`` in front of the command: ``taskset`` sets the
affinity and then execs the command, so the process (and every thread or
worker it creates later) is on that core from its first instruction, with no
window between fork and ``sched_setaffinity``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

#: Seconds a child gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """The benchmark cannot go on (a process did not start, a tool is missing)."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    cores: frozenset[int] | None
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        out: list[str] = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.extend(f"  {path.name}: {line}" for line in text)
        return "\n".join(out)


class Processes:
    """Owns the benchmark's children; ``with Processes(dir) as procs: ...``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: list[Child] = []
        self._taskset = shutil.which("taskset")

    @property
    def children(self) -> list[Child]:
        """The children still owned (not yet stopped)."""
        return list(self._children)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def pinned(self, argv: list[str], cores: frozenset[int] | None) -> list[str]:
        if not cores:
            return argv
        if self._taskset is None:
            raise BenchError("taskset (util-linux) is needed to pin processes to cores")
        return [self._taskset, "-c", ",".join(map(str, sorted(cores))), *argv]

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cores: frozenset[int] | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        n = len(self._children)
        out = self.workdir / f"{n:02d}-{name}.out"
        err = self.workdir / f"{n:02d}-{name}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                self.pinned(argv, cores),
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env=env,
                cwd=cwd,
            )
        child = Child(name, proc, out, err, cores, argv)
        self._children.append(child)
        return child

    def wait_for_output(self, child: Child, pattern: str, timeout_s: float) -> re.Match[str]:
        """Poll the child's stdout for ``pattern`` until it appears or time runs out."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            m = rx.search(child.output())
            if m is not None:
                return m
            if child.proc.poll() is not None:
                raise BenchError(
                    f"{child.name} exited with {child.proc.returncode} before it was ready:\n"
                    + child.log_tail()
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{child.name} not ready within {timeout_s}s:\n" + child.log_tail()
                )
            time.sleep(0.05)

    def wait_for_port(self, child: Child, host: str, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
                return
            if child.proc.poll() is not None:
                raise BenchError(
                    f"{child.name} exited with {child.proc.returncode} before it listened:\n"
                    + child.log_tail()
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} did not listen on {host}:{port} in {timeout_s}s")
            time.sleep(0.05)

    def stop(self, child: Child) -> None:
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=STOP_GRACE_S)
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        # Newest first: a proxy goes before the upstream it relays to.
        for child in reversed(list(self._children)):
            try:
                self.stop(child)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {child.name} (pid {child.pid}): {exc}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tools that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (nginx's workers, for instance)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    out.extend(int(c) for c in f.read().split())
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (all their threads), in seconds.

    From ``/proc/PID/stat`` (fields 14 and 15, in clock ticks: 10 ms
    resolution, fine for windows of seconds). A process that is gone counts 0.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # The command name (field 2) may hold spaces; it ends at the last ')'.
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def busy_cpu_seconds() -> float:
    """User, nice and system time of the whole machine (``/proc/stat``), in seconds.

    Interrupt and softirq time are left out, as they are from process times:
    the two are comparable, so their difference is what other processes used.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / _CLK_TCK


def _waited_children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ForeignCpu:
    """CPU time used during a block by processes that are not the benchmark's.

    The benchmark's own are: the long-lived children (proxies, upstreams, all
    their descendants), the children run and waited for inside the block (wrk,
    load generators) and the driver. Other engineers' test suites on a shared
    machine show up here; ``share`` is in cores (0.25 = a quarter of one core).
    """

    def __init__(self, procs: Processes) -> None:
        self._pids = [p for c in procs.children for p in descendants(c.pid)]
        self.seconds = 0.0
        self.share = 0.0

    def _own(self) -> float:
        return cpu_seconds(self._pids) + _waited_children_cpu() + _self_cpu()

    def __enter__(self) -> ForeignCpu:
        self._t0 = time.monotonic()
        self._busy0 = busy_cpu_seconds()
        self._own0 = self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        busy = busy_cpu_seconds() - self._busy0
        own = self._own() - self._own0
        self.seconds = max(0.0, busy - own)
        self.share = self.seconds / wall if wall > 0 else 0.0


def wait_quiet(procs: Processes, limit: float, max_wait_s: float) -> tuple[float, float]:
    """Wait until other processes use under ``limit`` cores over half a second.

    Returns (seconds waited, their last measured share). Gives up after
    ``max_wait_s``: the run then goes ahead and its foreign load is reported.
    """
    t0 = time.monotonic()
    while True:
        with ForeignCpu(procs) as f:
            time.sleep(0.5)
        waited = time.monotonic() - t0
        if f.share < limit or waited >= max_wait_s:
            return waited, f.share


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * _PAGE
    return total


def open_fds(pids: list[int]) -> int:
    """Descriptors the processes hold open now (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def fd_limit(pids: list[int]) -> int | None:
    """The lowest soft limit on open files among the processes (None: unlimited or unknown)."""
    limits = []
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    if soft.isdigit():
                        limits.append(int(soft))
    return min(limits) if limits else None


def cores_of(pid: int) -> str:
    """The cores every thread of ``pid`` may run on, e.g. ``"0"``."""
    lists = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        lists.add(line.split(":", 1)[1].strip())
    return "|".join(sorted(lists))
