from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from llmproxy.observability.metrics import (
    GAP_BUCKETS,
    LATENCY_BUCKETS,
    LoopCounter,
    LoopHistogram,
)


def exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus-client's Histogram adds a creation time, which ours leaves out.
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


@pytest.mark.parametrize("buckets", [GAP_BUCKETS, LATENCY_BUCKETS, (1, 2.5, 10)])
def test_loop_histogram_exposes_what_prometheus_histogram_does(
    buckets: tuple[float, ...],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(
        "gap_seconds", "Gaps.", ("route", "pool"), buckets=buckets, registry=theirs
    )
    histogram = LoopHistogram(
        "gap_seconds", "Gaps.", ("route", "pool"), buckets=buckets, registry=ours
    )
    rng = random.Random(7)
    # Values on every bound (le is "less or equal"), between them, beyond the
    # last one, zero and negative.
    values = [*buckets, 0.0, -1.0, buckets[-1] * 3]
    values += [rng.uniform(0, buckets[-1] * 1.5) for _ in range(500)]
    for i, v in enumerate(values):
        labels = ("chat", "main") if i % 3 else ("text", "main")
        reference.labels(*labels).observe(v)
        histogram.labels(*labels).observe(v)
    assert exposition(ours) == exposition(theirs)


def test_loop_histogram_without_observations_exposes_nothing_but_its_help() -> None:
    registry = CollectorRegistry()
    LoopHistogram("gap_seconds", "Gaps.", ("route",), buckets=(1.0,), registry=registry)
    assert exposition(registry) == ["# HELP gap_seconds Gaps.", "# TYPE gap_seconds histogram"]


def test_loop_histogram_refuses_the_wrong_number_of_labels() -> None:
    histogram = LoopHistogram(
        "gap_seconds", "Gaps.", ("route", "pool"), buckets=(1.0,), registry=CollectorRegistry()
    )
    with pytest.raises(ValueError, match="expected labels"):
        histogram.labels("chat")


def test_loop_histogram_name_clashes_are_refused_at_registration() -> None:
    registry = CollectorRegistry()
    Histogram("gap_seconds", "Gaps.", buckets=(1.0,), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        LoopHistogram("gap_seconds", "Gaps.", (), buckets=(1.0,), registry=registry)


def test_loop_counter_exposes_what_prometheus_counter_does() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("requests", "Requests.", ("route", "code"), registry=theirs)
    counter = LoopCounter("requests", "Requests.", ("route", "code"), registry=ours)
    rng = random.Random(7)
    for i in range(500):
        labels = ("chat", "200") if i % 3 else ("text", "503")
        amount = rng.choice([1, 1, 0, 7, 2.5])
        reference.labels(*labels).inc(amount)
        counter.labels(*labels).inc(amount)

    def masked(registry: CollectorRegistry) -> list[str]:
        # Both expose a creation time (``_created``); only its value differs.
        lines = generate_latest(registry).decode().splitlines()
        return [line.rsplit(" ", 1)[0] if "_created{" in line else line for line in lines]

    assert masked(ours) == masked(theirs)
    assert 'requests_total{code="503",route="text"}' in generate_latest(ours).decode()


def test_loop_counter_only_goes_up() -> None:
    counter = LoopCounter("requests", "Requests.", ("route",), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("chat").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("chat", "200")
