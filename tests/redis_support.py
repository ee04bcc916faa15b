"""A real redis-server on a free loopback port, for the shared-store tests.

redis-server cannot listen on port 0 and report the port, so a free port is
found by binding a socket to port 0 and closing it; if another process takes
it first, the start fails and is tried again on another port. Nothing is
persisted (``--save '' --appendonly no``). The server can be killed, paused
(SIGSTOP: a hung Redis) and restarted on the same port.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "redis-server is not installed: apt-get install redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.2) -> bool:
    """True if a Redis answers PING on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_HINT)
        self._binary = binary
        self._tmp = tmp
        self._log_path = tmp / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.port = 0
        for _ in range(5):
            self.port = free_port()
            if self._start():
                return
        raise RuntimeError(f"redis-server did not start: {self.log()}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-4000:] if self._log_path.exists() else ""

    def _start(self, timeout: float = 10.0) -> bool:
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    self._binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._tmp),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            if ping(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def restart(self) -> None:
        """Start again on the same port (after ``kill``), empty."""
        self.stop()
        if not self._start():
            raise RuntimeError(f"redis-server did not restart on {self.port}: {self.log()}")

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()
            self._proc.kill()
            self._proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self.resume()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    try:
        yield server
    finally:
        server.stop()
