"""Instructions per request: the gateway's cost as a count, not a time.

``python loadtests/instructions.py [--json OUT] [--compare BASELINE]``

The timed benchmark (``bench.py``) reports CPU time, which on a shared or
virtual machine moves by ±20 % from one minute to the next: a change of a few
percent cannot be seen in it. This runs the gateway under valgrind's callgrind
and counts the instructions it executes (user space, all its threads) while a
client sends a fixed number of requests; the count is the same from run to run
within about half a percent, whatever else the machine is doing. The kernel's
share (system calls, TCP on loopback) is not in it: compare counts between
versions of llmproxy, and CPU time against nginx with ``bench.py``.

Three windows, each after a warm-up, between a ``callgrind_control --zero``
and a ``--dump`` (start-up and warm-up are not counted):

- ``request``: small non-streamed chat completions, one at a time on one
  keep-alive connection, relayed from the canned fast upstream;
- ``stream``: streamed chat completions of one token from the simulated
  replica (the fixed cost of a stream: head, first event, end);
- ``event``: streamed completions of ``--tokens`` tokens, paced at
  ``--tokens-per-s`` so each event arrives in a read of its own; the cost per
  relayed SSE event is (this window - the ``stream`` window) / extra events.

Every feature stays on, as in ``bench.py`` (health checks, breaker, retries,
metrics, the access log); only health checks and saturation scrapes are
spaced 600 s apart, so that work done on a clock stays out of the counts.
Needs valgrind (``apt-get install
valgrind``); about two minutes. ``--compare`` reports counts that grew by more
than ``--margin`` (default 2 %) over a file written by ``--json``; the exit
status stays 0 (a report, not a gate).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_lib.procs import BenchError, Child, Processes  # noqa: E402
from bench_lib.settings import MODEL, PATH, SMALL_BODY  # noqa: E402
from bench_lib.targets import LLMPROXY_CONFIG, REPO  # noqa: E402

UPSTREAM_READY = r"listening on http://([\d.]+):(\d+)"
GATEWAY_READY = r"llmproxy listening on http://([\d.]+):(\d+)"
#: Under callgrind the gateway runs some 50 times slower: start-up takes a while.
START_TIMEOUT_S = 300.0


def _stream_body(tokens: int) -> str:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "stream": True,
        },
        separators=(",", ":"),
    )


class Counted:
    """The gateway under callgrind; a window's count is zeroed, then dumped."""

    def __init__(self, child: Child, host: str, port: int, out: Path) -> None:
        self.child, self.host, self.port, self._out = child, host, port, out

    def _control(self, flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(self.child.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def client(self, body: str, n: int, *, sse: bool) -> dict[str, Any]:
        argv = [
            sys.executable, "-m", "bench_lib.latency_client", "--host", self.host,
            "--port", str(self.port), "--path", PATH, "--body", body,
            "--n", str(n), "--warmup", "0",
        ]  # fmt: skip
        if sse:
            argv.append("--sse")
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "PYTHONPATH": str(HERE)},
            check=False,
        )
        if r.returncode != 0:
            raise BenchError(f"latency_client failed:\n{r.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(r.stdout)
        if out["errors"]:
            raise BenchError(f"{out['errors']} request(s) failed through the gateway")
        return out

    def count(self, body: str, n: int, *, sse: bool, warmup: int) -> int:
        """Instructions executed while ``n`` requests went through."""
        self.client(body, warmup, sse=sse)
        before = set(self._out.parent.glob(self._out.name + "*"))
        self._control("--zero")
        self.client(body, n, sse=sse)
        self._control("--dump")
        deadline = time.monotonic() + 60
        while True:
            new = set(self._out.parent.glob(self._out.name + "*")) - before
            for path in new:
                m = re.search(r"^summary: (\d+)", path.read_text(errors="replace"), re.M)
                if m:
                    path.unlink()
                    return int(m.group(1))
            if time.monotonic() > deadline:
                raise BenchError("callgrind wrote no dump")
            time.sleep(0.2)


#: bench.py's config, with the periodic work (health checks, saturation
#: scrapes) spaced out of the counting windows: it runs on a clock, not per
#: request, and would otherwise land in a window or not by chance.
COUNTING_CONFIG = LLMPROXY_CONFIG.replace(
    "    timeouts:",
    "    health: {{interval_s: 600, jitter: 0}}\n"
    "    autoscale: {{scrape_interval_s: 600, stale_after_s: 1800}}\n"
    "    timeouts:",
)


def start_counted(procs: Processes, upstream_url: str, workdir: Path, src: Path) -> Counted:
    config = workdir / "llmproxy.yaml"
    config.write_text(COUNTING_CONFIG.format(upstream=upstream_url, workers=1))
    out = workdir / "callgrind.out"
    child = procs.start(
        "llmproxy-callgrind",
        [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
            sys.executable, "-m", "llmproxy", "serve", "--config", str(config),
        ],
        cores=None,
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
    )  # fmt: skip
    m = procs.wait_for_output(child, GATEWAY_READY, START_TIMEOUT_S)
    return Counted(child, m.group(1), int(m.group(2)), Path(f"{out}.{child.pid}"))


def start_upstream(procs: Processes, argv: list[str], cwd: Path) -> str:
    child = procs.start(
        "upstream", argv, cores=None, cwd=cwd, env={**os.environ, "PYTHONPATH": f"{HERE}:{REPO}"}
    )
    m = procs.wait_for_output(child, UPSTREAM_READY, 60)
    return f"http://{m.group(1)}:{m.group(2)}"


def _commit(src: Path) -> str | None:
    """The checkout's commit, marked ``+changes`` when its tree differs."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "llmproxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+changes" if dirty else "")


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    src = Path(args.llmproxy_src).resolve()
    result: dict[str, Any] = {
        "commit": _commit(src),
        "requests": args.requests,
        "streams": args.streams,
        "tokens": args.tokens,
    }
    with Processes(workdir) as procs:
        fast = start_upstream(
            procs, [sys.executable, "-m", "bench_lib.fast_upstream", "--port", "0"], HERE
        )
        gw = start_counted(procs, fast, workdir, src)
        print(f"llmproxy under callgrind on {gw.host}:{gw.port}; counting {args.requests} requests")
        total = gw.count(SMALL_BODY, args.requests, sse=False, warmup=args.warmup)
        result["per_request"] = total / args.requests
        procs.stop_all()
    with Processes(workdir) as procs:
        sim = start_upstream(
            procs,
            [
                sys.executable, "-m", "llmproxy.sim", "--port", "0", "--model", MODEL,
                "--ttft-ms", "0", "--tokens-per-s", f"{args.tokens_per_s:g}",
            ],
            src,
        )  # fmt: skip
        gw = start_counted(procs, sim, workdir, src)
        print(f"counting {args.streams} streams of 1 and of {args.tokens} tokens")
        one = gw.count(_stream_body(1), args.streams, sse=True, warmup=max(5, args.warmup // 10))
        many = gw.count(_stream_body(args.tokens), args.streams, sse=True, warmup=1)
        result["per_stream"] = one / args.streams
        result["per_event"] = (many - one) / (args.streams * (args.tokens - 1))
    return result


LABELS = {
    "per_request": "Instructions per small non-streamed request",
    "per_stream": "Instructions per streamed request of 1 token",
    "per_event": "Instructions per further relayed SSE event",
}


def report(result: dict[str, Any], baseline: dict[str, Any] | None, margin: float) -> None:
    print()
    head = "| Measurement | llmproxy |" + (" baseline | change |" if baseline else "")
    print(head)
    print("|---|---:|" + ("---:|---:|" if baseline else ""))
    worse = []
    for key, label in LABELS.items():
        row = f"| {label} | {result[key]:,.0f} |"
        if baseline and key in baseline:
            change = result[key] / baseline[key] - 1
            row += f" {baseline[key]:,.0f} | {change:+.1%} |"
            if change > margin:
                worse.append(f"{label}: {change:+.1%} (margin {margin:.0%})")
        print(row)
    if baseline is not None:
        print()
        print("\n".join(f"worse: {w}" for w in worse) or f"nothing grew by more than {margin:.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=500, help="counted requests (default 500)")
    p.add_argument("--streams", type=int, default=20, help="counted streams (default 20)")
    p.add_argument("--tokens", type=int, default=101, help="events per long stream (default 101)")
    p.add_argument("--tokens-per-s", type=float, default=200.0, help="pace of the events")
    p.add_argument("--warmup", type=int, default=200, help="requests before counting")
    p.add_argument("--json", dest="out", help="write the counts here")
    p.add_argument("--compare", help="a file written by --json: report what grew")
    p.add_argument("--margin", type=float, default=0.02, help="--compare margin (default 0.02)")
    p.add_argument("--llmproxy-src", default=str(REPO), help="the checkout to count")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install valgrind)")
    if args.tokens < 2:
        sys.exit("--tokens must be at least 2")
    baseline = json.loads(Path(args.compare).read_text()) if args.compare else None
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-instructions-"))
    started = time.monotonic()
    try:
        result = measure(args, workdir)
    except BenchError as exc:
        sys.exit(f"instructions: {exc}")
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    report(result, baseline, args.margin)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\ncounts written to {args.out}")


if __name__ == "__main__":
    main()
