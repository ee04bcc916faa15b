"""Many concurrent idle streams, held open at once; samples the proxy's memory.

``python -m bench_lib.hold_load --port P --streams 5000 --hold-s 2 --pids 123``

Against a replica that sends its first event at once and the next one only
much later (``--tokens-per-s`` far below 1), so every stream, once started,
holds its connections without traffic. Opens ``--streams`` streaming chat
completions in batches paced by the server (as ``sse_load`` does), waits until
every stream has received its first SSE event (or ``--ready-timeout-s``
passed, or ``--stall-s`` went by without progress), holds them ``--hold-s``
more, then closes them all (which the proxy must turn into cancelled upstream
requests).

Counts what the streams got: held (a first event, and still open at the end
of the hold), and every kind of error: connect errors, streams not opened
before the deadline, statuses other than 200 or closed before a response
head, no first event (no answer, or a head only), closed by the server after
their first event. Samples the RSS and the open descriptors of ``--pids`` (the
proxy under test) every ``--sample-s``: the peak is the cost of the open
streams. Standard library + uvloop. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time

from bench_lib.loop import run
from bench_lib.procs import open_fds, rss_bytes
from bench_lib.sse_load import Shared, Stream, build_request, close_all, open_streams


class Sampler:
    """The peak RSS and descriptor count of ``pids``, sampled in the background."""

    def __init__(self, pids: list[int], every_s: float) -> None:
        self.pids = pids
        self.every_s = every_s
        self.rss_peak = 0
        self.fds_peak = 0
        self.samples = 0
        #: A process under test went away while sampled.
        self.lost = False

    def sample(self) -> int:
        """One sample now; the RSS (0 when a process is gone)."""
        if not self.pids:
            return 0
        try:
            rss = rss_bytes(self.pids)
        except OSError:
            self.lost = True
            return 0
        self.rss_peak = max(self.rss_peak, rss)
        self.fds_peak = max(self.fds_peak, open_fds(self.pids))
        self.samples += 1
        return rss

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)


async def wait_first_events(streams: list[Stream], deadline: float, stall_s: float) -> bool:
    """Wait until every open stream has its first event; True if progress stalled.

    Gives up at ``deadline``, or when no stream got its first event (or
    closed) for ``stall_s``: a proxy out of descriptors leaves connections
    unanswered in its listen backlog, and they stay so while the others hold.
    """
    last, since = -1, time.monotonic()
    while True:
        pending = sum(1 for s in streams if not s.events and not s.closed)
        now = time.monotonic()
        if not pending or now >= deadline:
            return False
        if pending != last:
            last, since = pending, now
        elif now - since >= stall_s:
            return True
        await asyncio.sleep(0.1)


async def measure(ns: argparse.Namespace) -> dict[str, object]:
    shared = Shared(target=ns.streams)
    request = build_request(ns.host, ns.port, ns.path, ns.model, ns.max_tokens)
    sampler = Sampler(ns.pids, ns.sample_s)
    rss_before = sampler.sample()
    fds_before = open_fds(ns.pids)
    task = asyncio.create_task(sampler.run())
    try:
        t0 = time.monotonic()
        deadline = t0 + ns.ready_timeout_s
        streams, connect_errors = await open_streams(shared, request, ns, deadline=deadline)
        opened_s = time.monotonic() - t0
        stalled = await wait_first_events(streams, deadline, ns.stall_s)
        ready_s = time.monotonic() - t0
        up = sum(1 for s in streams if s.events and not s.closed)
        rss_up = sampler.sample()
        await asyncio.sleep(ns.hold_s)
        rss_held = sampler.sample()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    held = sum(1 for s in streams if s.events and not s.closed)
    dropped = sum(1 for s in streams if s.events and s.closed)
    # Streams without an event that did not fail outright: no answer, or a head only.
    no_first_event = sum(1 for s in streams if not s.events) - shared.failed
    close_all(streams)
    await asyncio.sleep(0.2)
    not_opened = ns.streams - len(streams) - connect_errors
    return {
        "streams_requested": ns.streams,
        "held": held,
        # Every stream not held, whatever the reason; the kinds follow.
        "errors": ns.streams - held,
        "connect_errors": connect_errors,
        "not_opened": not_opened,
        "failed": shared.failed,
        "statuses": shared.statuses,
        "no_first_event": no_first_event,
        "dropped": dropped,
        "dropped_while_held": up - held,
        "opened_s": opened_s,
        "ready_s": ready_s,
        "all_ready": up == ns.streams,
        "stalled": stalled,
        "hold_s": ns.hold_s,
        "rss_before_bytes": rss_before,
        "rss_up_bytes": rss_up,
        "rss_held_bytes": rss_held,
        "rss_peak_bytes": sampler.rss_peak,
        "fds_before": fds_before,
        "fds_peak": sampler.fds_peak,
        "samples": sampler.samples,
        "target_lost": sampler.lost,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--model", default="sim-model")
    p.add_argument("--streams", type=int, default=5000)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--batch-timeout-s", type=float, default=5.0)
    p.add_argument("--ready-timeout-s", type=float, default=60.0)
    p.add_argument("--stall-s", type=float, default=10.0)
    p.add_argument("--hold-s", type=float, default=2.0)
    p.add_argument("--sample-s", type=float, default=0.1)
    p.add_argument("--pids", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    ns = p.parse_args()
    json.dump(run(measure(ns)), sys.stdout)


if __name__ == "__main__":
    main()
