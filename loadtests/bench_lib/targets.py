"""What the benchmark measures: targets that stand between the client and an upstream.

A target kind knows how to start itself in front of an upstream, pinned to the
proxy core, and which processes' CPU time is its cost. ``direct`` is the
upstream itself (the baseline every proxy is compared with); ``llmproxy`` is
the gateway under test; ``nginx`` is an equivalent reverse proxy (keep-alive
upstream, no buffering), used when its binary is installed. Adding another
proxy is one more class with the same three members and one more entry in
:data:`KINDS`.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench_lib.procs import Processes, descendants, free_port

REPO = Path(__file__).resolve().parents[2]
#: How long a target may take to start listening.
START_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(slots=True)
class Running:
    """A target ready to take load."""

    name: str
    endpoint: Endpoint
    #: Processes whose CPU time and memory are the target's own (none for direct).
    pids: list[int] = field(default_factory=list)

    @property
    def is_proxy(self) -> bool:
        return bool(self.pids)


class TargetKind(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine, or None."""

    def start(
        self, procs: Processes, upstream: Endpoint, workdir: Path, cores: frozenset[int] | None
    ) -> Running: ...


class Direct:
    name = "direct"

    def unavailable(self) -> str | None:
        return None

    def start(
        self, procs: Processes, upstream: Endpoint, workdir: Path, cores: frozenset[int] | None
    ) -> Running:
        return Running(self.name, upstream)


LLMPROXY_CONFIG = """\
# Written by loadtests/bench.py. Every feature stays at its default (health
# checks, breaker, retries, outlier detection, the access log on stdout); no
# rate-limit rules.
server: {{host: 127.0.0.1, port: 0, workers: {workers}}}
admin: {{host: 127.0.0.1, port: 0}}
pools:
  main:
    balancer: least_connections
    backends: [{{url: "{upstream}"}}]
    timeouts: {{connect_s: 2, first_byte_s: 60, idle_s: 60, total_s: 3600}}
routes:
  - {{name: all, match: {{model: "*"}}, pool: main}}
"""


class Llmproxy:
    """The gateway under test, run from ``src`` (a checkout; default: this one)."""

    name = "llmproxy"

    def __init__(self, src: Path = REPO, workers: int = 1) -> None:
        self.src = src
        #: ``server.workers``: above 1, a supervisor and that many worker processes.
        self.workers = workers

    def unavailable(self) -> str | None:
        if not (self.src / "llmproxy" / "__main__.py").is_file():
            return f"no llmproxy package in {self.src}"
        return None

    def start(
        self, procs: Processes, upstream: Endpoint, workdir: Path, cores: frozenset[int] | None
    ) -> Running:
        config = workdir / "llmproxy.yaml"
        config.write_text(LLMPROXY_CONFIG.format(upstream=upstream.url, workers=self.workers))
        child = procs.start(
            "llmproxy",
            [sys.executable, "-m", "llmproxy", "serve", "--config", str(config)],
            cores=cores,
            cwd=self.src,
            env={**os.environ, "PYTHONPATH": str(self.src)},
        )
        m = procs.wait_for_output(
            child, r"llmproxy listening on http://([\d.]+):(\d+)", START_TIMEOUT_S
        )
        # The process taskset exec'd into, and with workers its children: the
        # supervisor announces only once every worker listens.
        return Running(self.name, Endpoint(m.group(1), int(m.group(2))), descendants(child.pid))


NGINX_CONFIG = """\
# Written by loadtests/bench.py: nginx as a plain reverse proxy, equivalent to
# llmproxy's data path (HTTP/1.1 keep-alive upstream, streamed, not buffered).
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  upstream replicas {{
    server {upstream};
    keepalive 1024;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_connect_timeout 2s;
      proxy_read_timeout 60s;
      proxy_send_timeout 60s;
    }}
  }}
}}
"""


def nofile_limit() -> int:
    """Open files a child may have: the hard limit, at most 65,536.

    A stream through a proxy takes two (client and upstream connection), and
    nginx counts both in ``worker_connections``; ``worker_rlimit_nofile`` above
    the hard limit would only fail (raising it needs CAP_SYS_RESOURCE).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)


class Nginx:
    """nginx, one worker; ``worker_connections`` counts client and upstream connections.

    Sized by the benchmark (:func:`nginx_connections`) so that nginx is not
    stopped by its own setting before the process runs out of descriptors;
    every slot costs RSS from the start (~0.4 KiB).
    """

    name = "nginx"

    def __init__(self, worker_connections: int = 16384) -> None:
        self.worker_connections = worker_connections

    def unavailable(self) -> str | None:
        if shutil.which("nginx") is None:
            return "nginx not found (apt-get install -y nginx to add it)"
        return None

    def start(
        self, procs: Processes, upstream: Endpoint, workdir: Path, cores: frozenset[int] | None
    ) -> Running:
        nginx = shutil.which("nginx")
        assert nginx is not None
        prefix = workdir / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        prefix.chmod(0o755)
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONFIG.format(
                prefix=prefix,
                port=port,
                upstream=f"{upstream.host}:{upstream.port}",
                nofile=nofile_limit(),
                connections=self.worker_connections,
            )
        )
        child = procs.start(
            "nginx",
            [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            cores=cores,
        )
        procs.wait_for_port(child, "127.0.0.1", port, START_TIMEOUT_S)
        # The master opens the socket before it forks the worker: wait for both.
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(pids := descendants(child.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Master and worker; the master is idle but counted (it is nginx's cost too).
        return Running(self.name, Endpoint("127.0.0.1", port), pids)


def nginx_version() -> str | None:
    nginx = shutil.which("nginx")
    if nginx is None:
        return None
    r = subprocess.run([nginx, "-v"], check=False, capture_output=True, text=True, timeout=10)
    return (r.stderr or r.stdout).strip().removeprefix("nginx version: ")


def nginx_connections(max_streams: int) -> int:
    """``worker_connections`` for ``max_streams`` streams open at once (at least 16,384).

    Two per stream and 1,024 spare; then 1/16 more, because once no more than
    1/16 of the slots are free nginx closes accepted connections that have not
    sent their request yet ("worker_connections are not enough, reusing
    connections", ``ngx_drain_connections``): streams still opening would fail.
    """
    return max(16384, (2 * max_streams + 1024) * 16 // 15 + 1)


def target_kinds(llmproxy_src: Path = REPO, max_streams: int = 0) -> dict[str, TargetKind]:
    """Every target kind by name, in report order; ``max_streams`` open at once at most."""
    nginx = Nginx(nginx_connections(max_streams))
    return {k.name: k for k in (Direct(), Llmproxy(llmproxy_src), nginx)}


NAMES = tuple(target_kinds())
