"""The benchmark's arithmetic: the regression check (issue 6, item 6) and
the idle-core probe's time-weighted wait. Pure functions, no processes."""

from __future__ import annotations

from array import array
from typing import Any

import pytest
from bench_lib.report import (
    compare,
    failures,
    goals,
    invalid_cells,
    markdown_table,
    paired_ratios,
    ratios,
    summarize,
)
from bench_lib.wake_probe import stats, time_weighted


def _doc(rps: float, nginx_rps: float, cpu_us: float, added_p50_ms: float) -> dict[str, Any]:
    """A --json document as bench.py writes it, reduced to what compare() reads."""
    summary = {
        "rps": {"llmproxy": rps, "nginx": nginx_rps},
        "cpu_us_per_req": {"llmproxy": cpu_us, "nginx": 15.0},
        "added_p50_ms": {"llmproxy": added_p50_ms, "nginx": 0.1},
    }
    return {"summary": summary, "ratios": ratios(summary, ["llmproxy", "nginx"])}


def _verdicts(table: str) -> dict[str, str]:
    rows = [line.split("|") for line in table.splitlines()[2:]]
    return {cells[2].strip(): cells[6].strip() for cells in rows}


def test_an_unchanged_run_reports_nothing_worse() -> None:
    base = _doc(14_000, 60_000, 70.0, 0.17)
    table, worse = compare(base, base, margin=0.10)
    assert worse == 0
    assert set(_verdicts(table).values()) == {"same", "(absolute row)"}


def test_a_ratio_worse_by_more_than_the_margin_is_reported() -> None:
    base = _doc(14_000, 60_000, 70.0, 0.17)
    now = _doc(11_000, 60_000, 90.0, 0.17)  # -21 % req/s, +29 % CPU per request
    table, worse = compare(now, base, margin=0.10)
    v = _verdicts(table)
    assert v["rps:llmproxy/nginx"] == "**WORSE**"
    assert v["cpu_us_per_req:llmproxy/nginx"] == "**WORSE**"
    assert v["rps:llmproxy"] == "**WORSE**"
    assert v["added_p50_ms:llmproxy"] == "same"
    assert worse == 4  # two ratios, two absolute medians


def test_a_change_within_the_margin_is_not_worse() -> None:
    base = _doc(14_000, 60_000, 70.0, 0.17)
    now = _doc(13_000, 60_000, 75.0, 0.17)  # -7 %, +7 %
    _, worse = compare(now, base, margin=0.10)
    assert worse == 0


def test_added_latency_is_judged_by_its_floor_not_by_a_percentage() -> None:
    # +0.03 ms is +30 % of a tiny value, but under the 0.05 ms floor: noise.
    table, worse = compare(_doc(14_000, 60_000, 70.0, 0.13), _doc(14_000, 60_000, 70.0, 0.10), 0.10)
    assert worse == 0
    # Nor is its ratio to nginx's (1.0x -> 1.3x) judged on its own.
    assert _verdicts(table)["added_p50_ms:llmproxy/nginx"] == "(absolute row)"
    table, worse = compare(_doc(14_000, 60_000, 70.0, 0.25), _doc(14_000, 60_000, 70.0, 0.10), 0.10)
    assert _verdicts(table)["added_p50_ms:llmproxy"] == "**WORSE**"
    assert worse == 1


def test_better_figures_are_called_better() -> None:
    base = _doc(14_000, 60_000, 70.0, 0.17)
    now = _doc(16_000, 60_000, 60.0, 0.17)
    table, worse = compare(now, base, margin=0.10)
    assert worse == 0
    assert _verdicts(table)["rps:llmproxy/nginx"] == "better"


def test_nothing_in_common_says_so() -> None:
    table, worse = compare({"summary": {}, "ratios": {}}, _doc(1, 1, 1, 1), 0.10)
    assert worse == 0
    assert "nothing in common" in table


def test_the_idle_core_probe_is_summarized_from_the_direct_runs_only() -> None:
    probe = {"wait_p99_ms": 0.1, "wait_p999_ms": 1.5, "max_ms": 4.0}
    sse_run = {"events_per_s": 19_800, "events": 198_000, "gaps": {"n": 0}}
    proxied = {**sse_run, "target_cpu_s": 3.6, "target_rss_bytes": 1, "streams_streaming": 1}
    raw = {"sse": {"direct": [{**sse_run, "core_wake": probe}], "llmproxy": [proxied]}}
    s = summarize(raw, ["direct", "llmproxy"])
    assert s["sse_core_wait_p999_ms"] == {"direct": 1.5}
    assert s["sse_core_wait_max_ms"] == {"direct": 4.0}
    assert s["sse_core_wait_p99_ms"] == {"direct": 0.1}


# -- the idle-core probe ---------------------------------------------------------


def test_one_long_wake_up_delays_every_moment_it_covers() -> None:
    # 1 s of 1 ms sleeps: one came 5 ms late, the rest on time. Work arriving
    # during those 5 ms waits 5..0 ms: 0.1 % of the second waits over 4 ms.
    late = [0.0] * 900 + [0.005]
    assert time_weighted(late, 1.0, 0.001) == pytest.approx(0.004, abs=1e-6)
    # 1 % of the time waiting longer than d: not even the 5 ms add up to that.
    assert time_weighted(late, 1.0, 0.01) == pytest.approx(0.0, abs=1e-6)


def test_many_short_wake_ups_add_up() -> None:
    # Every 1 ms sleep 0.1 ms late: 1,000 x (0.1 ms - d) must be 1 % of 1.1 s.
    late = [0.0001] * 1000
    d = time_weighted(late, 1.1, 0.01)
    assert 1000 * (0.0001 - d) == pytest.approx(0.011, rel=1e-3)


def test_probe_stats_give_per_sleep_and_per_moment_figures() -> None:
    late = array("d", [0.0001] * 999 + [0.006])
    out = stats(late, 1.2)
    assert out["n"] == 1000
    assert out["p50_ms"] == pytest.approx(0.1)
    assert out["max_ms"] == pytest.approx(6.0)
    assert out["wait_p999_ms"] > out["wait_p99_ms"]
    assert stats(array("d"), 1.0) == {"n": 0}


# -- workers ---------------------------------------------------------------------


def _wrk(rps: float, status: int = 0, socket_errors: int = 0) -> dict[str, float]:
    """A wrk run of 10 s in which the gateway used one core's worth of CPU per 10,000 req/s."""
    cores = rps / 10_000
    return {
        "rps": rps,
        "status": status,
        "socket_errors": socket_errors,
        "target_cpu_s": 10 * cores,
        "target_cpu_share": cores,
        "target_cpu_us_per_request": 100.0,
    }


def test_worker_scaling_is_taken_within_each_run_then_the_median() -> None:
    runs = [
        {"by_workers": {"1": _wrk(7_000), "2": _wrk(12_600)}},  # 1.8x
        {"by_workers": {"1": _wrk(9_000), "2": _wrk(13_500)}},  # 1.5x
        {"by_workers": {"1": _wrk(8_000), "2": _wrk(13_600)}},  # 1.7x
    ]
    s = summarize({"workers": {"llmproxy": runs}}, ["direct", "llmproxy"])
    assert s["workers_rps_1"] == {"llmproxy": 8_000}
    assert s["workers_rps_2"] == {"llmproxy": 13_500}
    # Not 13,500 / 8,000 (the medians' quotient): the runs' own ratios.
    assert s["workers_scaling"]["llmproxy"] == pytest.approx(1.7)
    assert s["workers_cpu_us_1"] == s["workers_cpu_us_2"] == {"llmproxy": 100.0}
    assert s["workers_cores_2"]["llmproxy"] == pytest.approx(1.35)


def test_failed_requests_with_workers_invalidate_the_measurement() -> None:
    raw = {"workers": {"llmproxy": [{"by_workers": {"1": _wrk(8_000), "2": _wrk(9_000, 3)}}]}}
    assert failures(raw) == {"llmproxy": {"workers": "3 non-2xx, 0 socket errors"}}
    assert ("workers_scaling", "llmproxy") in invalid_cells(raw)


# -- ratios taken run by run ---------------------------------------------------------


def _sse_runs(cpu_us: list[float]) -> list[dict[str, float]]:
    return [{"target_cpu_s": c / 1e6 * 1000, "events": 1000} for c in cpu_us]


def test_cpu_ratios_are_the_median_of_each_runs_own_ratio() -> None:
    # Run 1 was a slow minute for llmproxy's turn; runs 2 and 3 were even.
    raw = {"sse": {"llmproxy": _sse_runs([20, 10, 12]), "nginx": _sse_runs([10, 11, 12])}}
    paired = paired_ratios(raw, ["direct", "llmproxy", "nginx"])
    # Per run: 2.0, 0.91, 1.0. The medians' quotient would be 12 / 11 = 1.09.
    assert paired["sse_cpu_us_per_event"]["nginx"] == pytest.approx(1.0)
    summary = {"sse_cpu_us_per_event": {"llmproxy": 12.0, "nginx": 11.0}}
    on_cpu = [
        g for g in goals(summary, set(), paired=paired)
        if g["metric"] == "sse_cpu_us_per_event" and "nginx" in g["goal"]
    ]  # fmt: skip
    assert [g["value"] for g in on_cpu] == [pytest.approx(1.0)]
    table = markdown_table(summary, ["llmproxy", "nginx"], paired=paired)
    assert "| 1.00x |" in table


def test_runs_that_do_not_pair_fall_back_to_the_ratio_of_medians() -> None:
    raw = {"sse": {"llmproxy": _sse_runs([20, 10, 12]), "nginx": _sse_runs([10, 11])}}
    assert paired_ratios(raw, ["llmproxy", "nginx"]) == {}
    summary = {"sse_cpu_us_per_event": {"llmproxy": 12.0, "nginx": 10.5}}
    r = ratios(summary, ["llmproxy", "nginx"], paired={})
    assert r["sse_cpu_us_per_event:llmproxy/nginx"]["value"] == pytest.approx(12.0 / 10.5)
