"""Chaos: replicas die, hang, fail, slow down and flap under steady load.

Three simulated replica processes behind one gateway process; 16 concurrent
clients (half streaming, half not) in the test process. Every pass condition
is about what the clients saw on the wire, what the replicas counted and what
the gateway exposes (admin state, metrics). Each scenario is bounded: a few
fixed load windows and polls with deadlines.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.chaos.conftest import Cluster, backend, backend_name, chaos_config, metric
from tests.chaos.load import Load, Record, mixed, summary
from tests.support import wait_for

pytestmark = pytest.mark.chaos


def served_share(records: list[Record], name: str) -> float:
    served = [r for r in records if r.ok]
    assert served, "no request was served in the window"
    return sum(r.backend == name for r in served) / len(served)


def test_kill_9_one_replica_mid_load(cluster: Cluster) -> None:
    sims = cluster.sims(3)
    victim, name = sims[0], backend_name(sims[0])
    gw = cluster.gateway(chaos_config(*(s.url for s in sims)))
    # 80-token streams: ~0.8 s on the replica, never less (its delays are
    # sleeps; a loaded runner only stretches them).
    with Load(gw.url, client="openai", shape=mixed(stream_tokens=80)) as load:
        load.window(1.0)

        def victim_mid_stream() -> bool:
            """A client holds the first byte of a stream from the victim that
            started < 0.6 s ago: the replica cannot have finished it yet."""
            now = time.monotonic()
            return any(
                r.stream and r.backend == name and r.first_byte and now - r.started < 0.6
                for r in list(load.records)
            )

        # Kill while a stream from it is past the commit point: the case
        # that cannot be hidden from the client.
        wait_for(victim_mid_stream, 5, interval=0.005, what="a stream mid-way on the victim")
        t_kill = time.monotonic()
        victim.kill()
        # From 1 s after the kill the gateway must not even try the dead
        # replica: no connection attempt (upstream error) counted for it.
        load.window(1.0)
        errors_at_1s = metric(gw.metrics(), "llmproxy_upstream_errors_total", backend=name)
        load.window(1.0)
        errors_later = metric(gw.metrics(), "llmproxy_upstream_errors_total", backend=name)
        t_restart = time.monotonic()
        reborn = cluster.restart(victim, name="sim0-restarted")
        wait_for(lambda: backend(gw, name)["healthy"], 5, what="restarted replica healthy again")
        t_healthy = time.monotonic()
        # Its breaker, half-open after the health checks pass, lets one probe
        # through at a time until one succeeds; then it takes its share.
        wait_for(lambda: any(r.backend == name for r in load.since(t_healthy)), 5,
                 what="new traffic on the restarted replica")  # fmt: skip
    records = load.stop()
    report = summary(records, t_kill)
    print(report)

    failed = [r for r in records if not r.ok]
    # Zero failed non-streamed requests; zero failed streams before their first byte.
    assert not [r for r in failed if not r.stream], report
    assert not [r for r in failed if r.first_byte is None], report
    # The only failures allowed: streams committed on the victim, cut by the
    # kill, which end with the SSE error event (not a hang, not a bare EOF).
    for r in failed:
        assert r.backend == name, report
        assert r.in_flight_at(t_kill), report
        assert r.outcome == "sse_error", report
        assert isinstance(r.error, dict), report
        assert r.error.get("message"), report
    in_flight = [r for r in records if r.stream and r.backend == name and r.in_flight_at(t_kill)]
    assert in_flight, f"no stream was in flight on the victim at the kill\n{report}"
    assert any(r.outcome == "sse_error" for r in in_flight), report

    # The dead replica got no new requests from 1 s after the kill until its
    # restart: no attempt on it (metric) and every request there was served
    # at the first attempt by another replica.
    assert errors_later == errors_at_1s, (errors_at_1s, errors_later)
    quiet = [r for r in records if t_kill + 1.0 <= r.started < t_restart]
    assert quiet, report
    assert all(r.backend != name and r.attempts == 1 for r in quiet), summary(quiet, t_kill)

    # Back in service after passing its health checks.
    assert reborn.stats()["requests"] > 0
    assert sum(r.backend == name for r in records if r.started >= t_healthy) > 0, report


def test_hung_replica_is_timed_out_and_broken(cluster: Cluster) -> None:
    first_byte_s = 0.5
    sims = cluster.sims(3)
    hung, name = sims[0], backend_name(sims[0])
    cfg = chaos_config(
        *(s.url for s in sims),
        timeouts={"first_byte_s": first_byte_s},
        # Open for the rest of the scenario once opened; ejection later than
        # the breaker, so the breaker is what takes the replica out.
        breaker={"failure_threshold": 3, "reset_timeout_s": 30.0},
        outlier={"consecutive_failures": 10, "base_ejection_s": 30.0},
    )
    gw = cluster.gateway(cfg)
    with Load(gw.url, client="openai") as load:
        load.window(1.0)
        t_hang = time.monotonic()
        hung.faults(hang=True)
        wait_for(lambda: backend(gw, name)["breaker"]["state"] == "open", 5,
                 what="breaker of the hung replica open")  # fmt: skip
        t_open = time.monotonic()
        reached = hung.stats()["requests"]
        load.window(1.5)
        reached_later = hung.stats()["requests"]
        breaker_metric = metric(gw.metrics(), "llmproxy_breaker_state", backend=name)
    records = load.stop()
    report = summary(records, t_hang)
    print(report)

    # Every hang happens before the first byte: invisible to the clients.
    assert all(r.ok for r in records), report
    # No client waited longer than the first-byte timeout plus one normal
    # request on a healthy replica (the slowest of its kind before the fault)
    # plus 0.5 s for backoff and scheduling noise on a loaded 2-core runner.
    before = [r for r in records if r.ended < t_hang]
    for stream in (False, True):
        normal = max(r.duration for r in before if r.stream == stream)
        bound = first_byte_s + normal + 0.5
        late = [r for r in records if r.stream == stream and r.duration > bound]
        slowest = max(r.duration for r in records if r.stream == stream)
        print(f"stream={stream} normal {normal:.3f} slowest {slowest:.3f} bound {bound:.3f}")
        assert not late, f"bound {bound:.3f}s\n{summary(late, t_hang)}"
    assert any(r.attempts and r.attempts > 1 for r in records), "no request met the hang"
    # Breaker open: visible in the metric, and no request reaches the replica.
    assert breaker_metric == 2
    assert reached_later == reached, (reached, reached_later, t_open - t_hang)
    # The abandoned upstream requests were closed, not left hanging.
    wait_for(lambda: hung.stats()["hanging"] == 0, 5, what="hung requests released")


def test_half_of_one_replicas_requests_fail_with_503(cluster: Cluster) -> None:
    budget_ratio, min_retries = 0.3, 3
    sims = cluster.sims(3)
    flaky, name = sims[0], backend_name(sims[0])
    flaky.faults(error_rate=0.5, error_status=503)
    cfg = chaos_config(
        *(s.url for s in sims),
        # With its fair third of first attempts, a sixth of requests need a
        # retry; a 30 % budget covers that with room for bursts. (It fails in
        # ~1 ms, so its in-flight count stays low: least_connections must not
        # let that draw traffic to it.)
        retry={"budget_ratio": budget_ratio, "min_retries": min_retries},
        breaker={"failure_threshold": 5, "reset_timeout_s": 0.5},
        outlier={"consecutive_failures": 5, "base_ejection_s": 0.5},
    )
    gw = cluster.gateway(cfg)
    with Load(gw.url, client="openai") as load:
        load.window(3.0)
    records = load.stop()
    text = gw.metrics()
    injected = flaky.stats()["errors_injected"]
    retries = metric(text, "llmproxy_retries_total", pool="main")
    requests = metric(text, "llmproxy_requests_total", pool="main")
    exhausted = metric(text, "llmproxy_retry_budget_exhausted_total")
    report = (
        f"{summary(records)}\ninjected {injected}, retries {retries}, requests {requests},"
        f" budget exhausted {exhausted}"
    )
    print(report)

    assert all(r.ok for r in records), report
    assert injected > 0, "the flaky replica failed nothing: the scenario tested nothing"
    assert requests == len(records), (requests, len(records))
    # Within budget, and no wasted retry: each injected 503 was retried
    # exactly once, on a replica that had not failed the request.
    assert retries <= budget_ratio * requests + min_retries, (retries, requests)
    assert retries == injected, (retries, injected)
    assert sum((r.attempts or 1) - 1 for r in records) == retries
    assert metric(text, "llmproxy_retry_budget_exhausted_total") == 0
    assert all(r.backend != name or r.attempts == 1 for r in records), report


def test_all_replicas_down(cluster: Cluster) -> None:
    budget_ratio, min_retries = 0.2, 3
    sims = cluster.sims(3)
    gw = cluster.gateway(chaos_config(*(s.url for s in sims)))
    with Load(gw.url, client="aiohttp") as load:
        load.window(0.5)
        errors_before = metric(gw.metrics(), "llmproxy_upstream_errors_total")
        for s in sims:
            s.signal(signal.SIGKILL)
        for s in sims:
            s.popen.wait(timeout=10)
        t_down = time.monotonic()  # all three are gone from here on
        wait_for(lambda: gw.state()["pools"]["main"]["eligible"] == 0, 5,
                 what="no eligible backend")  # fmt: skip
        t_detect = time.monotonic()
        errors_detect = metric(gw.metrics(), "llmproxy_upstream_errors_total")
        load.window(1.5)
        text = gw.metrics()
    records = load.stop()
    report = summary(records, t_down)
    print(report)

    after = [r for r in records if r.started >= t_down]
    refused = [r for r in records if r.started >= t_detect]
    assert len(refused) >= 16, report
    for r in after:
        # An OpenAI-shaped JSON error, fast: 2 s bounds connect errors on
        # loopback (immediate) plus two backoffs (<= 0.05 s) plus scheduling.
        assert r.outcome == "http", r.brief(t_down)
        # Every one a 503 with Retry-After: refused at once once the gateway
        # knows, and before that, when every attempt failed to connect.
        assert r.status == 503, r.brief(t_down)
        assert isinstance(r.error, dict), r.brief(t_down)
        assert {"message", "type", "code"} <= set(r.error["error"]), r.brief(t_down)
        assert r.duration < 2.0, r.brief(t_down)
        assert r.retry_after, r.brief(t_down)
        assert int(r.retry_after) >= 1, r.brief(t_down)
    print(f"{len(after)} after the kill, detected in {t_detect - t_down:.3f}s")
    assert metric(text, "llmproxy_no_eligible_backend_total", pool="main") >= len(refused)

    # No retry storm. Attempts after the kill are at most one per request
    # started since, one per request in flight at the kill, and the retries
    # the budget allows (budget_ratio x every request of the window + floor).
    errors_end = metric(text, "llmproxy_upstream_errors_total")
    in_flight = [r for r in records if r.in_flight_at(t_down)]
    bound = len(after) + len(in_flight) + budget_ratio * len(records) + min_retries
    print(f"attempts after kill {errors_end - errors_before} bound {bound}")
    assert errors_end - errors_before <= bound, (errors_end - errors_before, bound)
    retries = metric(text, "llmproxy_retries_total", pool="main")
    assert retries <= budget_ratio * len(records) + min_retries, (retries, len(records))
    header_attempts = sum(r.attempts or 0 for r in after)
    assert header_attempts <= len(after) + budget_ratio * len(records) + min_retries
    # And none at all once no backend is eligible.
    assert errors_end == errors_detect, (errors_detect, errors_end)


def test_one_replica_ten_times_slower(cluster: Cluster) -> None:
    sims = cluster.sims(3)
    slow, name = sims[0], backend_name(sims[0])
    cfg = chaos_config(*(s.url for s in sims), timeouts={"first_byte_s": 5.0, "idle_s": 5.0})
    gw = cluster.gateway(cfg)
    with Load(gw.url, client="openai") as load:
        load.window(1.0)
        t_slow = time.monotonic()
        slow.faults(slow_factor=10.0)
        load.window(3.0)
    records = load.stop()
    report = summary(records, t_slow)
    print(report)

    assert all(r.ok for r in records), report
    before = [r for r in records if r.ended < t_slow]
    later = [r for r in records if r.started >= t_slow + 1.0]
    share_before, share_later = served_share(before, name), served_share(later, name)
    print(f"share before {share_before:.3f} later {share_later:.3f}")
    # Sanity: before the fault it was in normal rotation. A fair share is a
    # third; 0.15 leaves room for a replica starved of CPU on a busy runner.
    assert share_before >= 0.15, summary(before, t_slow)
    # Stated time: 1 s after the slowdown, its share of new requests is well
    # below a third (least connections alone predicts ~5-10 %), and at most
    # half of what it had.
    assert share_later < 0.15, summary(later, t_slow)
    assert share_later <= share_before / 2, (share_before, share_later)


def test_health_flapping_faster_than_thresholds(cluster: Cluster) -> None:
    sims = cluster.sims(3)
    flapper, name = sims[0], backend_name(sims[0])
    cfg = chaos_config(
        *(s.url for s in sims),
        health={"interval_s": 0.2, "timeout_s": 1.0, "healthy_threshold": 3,
                "unhealthy_threshold": 3, "jitter": 0.2},
    )  # fmt: skip
    gw = cluster.gateway(cfg)
    wait_for(lambda: all(b["healthy"] for b in gw.state()["pools"]["main"]["backends"]), 5,
             what="all healthy")  # fmt: skip

    # Flip /health after every probe the replica sees, so consecutive probes
    # alternate fail/pass: the fastest flapping there is, and never the three
    # results in a row that either threshold needs.
    stop, toggles = threading.Event(), [0]

    def flap() -> None:
        seen, unhealthy = flapper.stats()["health_checks"], False
        while not stop.is_set():
            checks = flapper.stats()["health_checks"]
            if checks != seen:
                seen, unhealthy = checks, not unhealthy
                flapper.faults(unhealthy=unhealthy)
                toggles[0] += 1
            stop.wait(0.005)

    flapping = threading.Thread(target=flap, daemon=True)
    states: list[dict[str, object]] = []
    with Load(gw.url, client="openai") as load:
        flapping.start()
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # a fixed 3 s window, sampled
                states.append(backend(gw, name))
                time.sleep(0.05)
            t_end = time.monotonic()
        finally:
            stop.set()
            flapping.join(5)
    records = load.stop()
    text = gw.metrics()

    print(f"toggles {toggles[0]} states {len(states)} share {served_share(records, name):.3f}")
    assert toggles[0] >= 8, f"only {toggles[0]} flips: the replica barely flapped"
    assert metric(text, "llmproxy_health_checks_total", backend=name, result="fail") >= 4
    assert all(s["healthy"] and s["available"] for s in states), [
        s for s in states if not (s["healthy"] and s["available"])
    ][:3]
    assert metric(text, "llmproxy_health_transitions_total", backend=name) == 0
    assert all(r.ok for r in records), summary(records)
    # Routing did not flap either: it kept its share (a third; 0.15 leaves
    # room for CPU starvation on a busy runner), in every half second.
    assert served_share(records, name) >= 0.15, summary(records)
    t0 = records[0].started
    bins = {int((r.started - t0) / 0.5) for r in records if r.backend == name}
    assert bins >= set(range(int((t_end - t0) / 0.5))), (sorted(bins), summary(records, t0))
