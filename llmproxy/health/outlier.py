"""Passive outlier detection for one pool (Envoy's ``outlier_detection``).

Fed one outcome per finished request by the forwarder, it does two things:

* **Ejects** a backend after ``consecutive_failures`` failures in a row (the
  caller decides what a failure is: connect error, timeout, 5xx). The n-th
  ejection lasts ``min(base_ejection_s * n, max_ejection_s)``; after a backend
  has stayed un-ejected for ``max_ejection_s`` its count drops by one (again
  for each further ``max_ejection_s``), as Envoy does.
* **Cuts the weight** of a backend whose smoothed time to first byte (TTFB) is
  more than ``latency_factor`` times the pool median. It is not ejected: a slow
  replica still serves, and moving all its load onto the others could make them
  slow too (a cascade). Its small remaining share keeps samples coming, so its
  EWMA, and with it its weight, recovers when it speeds up.

Pure and synchronous: no I/O, no clock read; every call that depends on time
takes ``now`` in monotonic seconds. All state lives in the instance. Outcomes
for names the detector does not know (a request that ended after a reload
removed its backend) are ignored.

Hot-path cost: ``on_success``/``on_failure`` do O(1) work a call, plus an
amortised share of two lazy jobs. Ended ejections sit in a heap popped only when
due. The pool median of EWMAs is cached and re-sorted only when a backend first
reaches ``latency_min_samples``, on ``set_backends``, or when some EWMA has
drifted more than 10 % from its value at the last sort -- and then at most once
per ``len(pool)`` samples. While every EWMA is within 10 % of its sorted value,
the cached median is within 10 % of the true one; a pool-wide shift is caught
within ``len(pool)`` samples (meanwhile all weights are cut alike, so their
ratios, which are what balancers use, barely move).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict

from llmproxy.config.schema import OutlierConfig

#: Smallest latency weight factor: a 100x slower backend still gets a trickle.
MIN_WEIGHT_FACTOR = 0.05
#: Relative EWMA drift that makes the cached pool median stale.
_MEDIAN_DRIFT = 0.1


@dataclass(frozen=True, slots=True)
class Ejection:
    """A backend was just ejected until ``until`` (monotonic s); ``count`` is
    its number of ejections, this one included, after decay."""

    name: str
    until: float
    count: int
    reason: str = "consecutive_failures"


class OutlierSnapshot(TypedDict):
    """One backend's detector state for the admin API (JSON-ready)."""

    consecutive_failures: int
    ejected: bool
    #: Seconds until the ejection ends; 0.0 when not ejected.
    ejected_until_in_s: float
    times_ejected: int
    #: ``None`` until the first TTFB sample.
    ttfb_ewma_ms: float | None
    samples: int
    weight_factor: float


@dataclass(slots=True)
class _State:
    failures: int = 0
    #: Ejected iff ``until > now``; 0.0 = never ejected.
    until: float = 0.0
    times_ejected: int = 0
    #: Start of the current decay period: the end of the last ejection, moved
    #: forward by one ``max_ejection_s`` per decrement.
    healthy_since: float = 0.0
    ewma: float = 0.0  # seconds
    samples: int = 0
    #: ``ewma`` when the pool median was last computed.
    baseline: float = 0.0


class OutlierDetector:
    """Consecutive-failure ejection and latency weight cuts for one pool.

    Ejection cap, counted over the backends this detector knows (ejections by
    this detector only; the health checker's verdicts are the pool's business):
    with ``n`` backends of which ``e`` are ejected, one more may be ejected iff
    ``n - e >= 2`` (never the last one standing, so a pool of one never ejects)
    and either ``e == 0`` (one may always go) or
    ``(e + 1) * 100 <= max_ejection_percent * n``. At 50 % a pool of 3 ejects
    one, a pool of 10 five. A refused ejection is retried on each further
    consecutive failure, so it happens as soon as room frees up.

    Ended ejections are reported by :meth:`expired`, once each.
    """

    def __init__(self, cfg: OutlierConfig, names: Iterable[str]) -> None:
        self._cfg = cfg
        self._states: dict[str, _State] = {}
        #: Names ejected and not yet reaped, with their ``until``.
        self._ejected: dict[str, float] = {}
        #: ``(until, name)``; entries not matching ``_ejected`` are stale.
        self._heap: list[tuple[float, str]] = []
        #: Reaped but not yet reported by ``expired`` (a dict keeps order).
        self._returned: dict[str, None] = {}
        self._median: float | None = None
        self._median_stale = False
        self._since_median = 0
        self.set_backends(names)

    def set_backends(self, names: Iterable[str], cfg: OutlierConfig | None = None) -> None:
        """Adopt a reloaded backend list (and config, if given). Backends that
        stay keep their state, ejection included; new ones start clean."""
        if cfg is not None:
            self._cfg = cfg
        self._states = {n: self._states.get(n) or _State() for n in names}
        self._ejected = {n: u for n, u in self._ejected.items() if n in self._states}
        self._returned = {n: None for n in self._returned if n in self._states}
        self._refresh_median()

    def on_success(self, name: str, now: float, ttfb_s: float | None) -> None:
        """A request succeeded: reset the failure run; fold in its TTFB (s)."""
        st = self._states.get(name)
        if st is None:
            return
        st.failures = 0
        if ttfb_s is None:
            return
        ttfb_s = max(0.0, ttfb_s)
        alpha = self._cfg.latency_alpha if st.samples else 1.0  # the first sample seeds it
        st.ewma += alpha * (ttfb_s - st.ewma)
        st.samples += 1
        self._since_median += 1
        min_samples = self._cfg.latency_min_samples
        if st.samples == min_samples:  # joins the judged set: once per backend
            self._refresh_median()
            return
        if self._median is None:
            return  # fewer than two judged: no median to refresh until one joins
        if st.samples > min_samples and abs(st.ewma - st.baseline) > _MEDIAN_DRIFT * st.baseline:
            self._median_stale = True
        if self._median_stale and self._since_median >= len(self._states):
            self._refresh_median()

    def on_failure(self, name: str, now: float) -> Ejection | None:
        """Count a failure; eject and return the :class:`Ejection` at the threshold.

        Failures of an already ejected backend (requests sent before it was
        ejected) are not counted: it returns with a clean slate.
        """
        st = self._states.get(name)
        if st is None or st.until > now:
            return None
        st.failures += 1
        if not self._cfg.enabled or st.failures < self._cfg.consecutive_failures:
            return None
        self._reap(now)
        n, e = len(self._states), len(self._ejected)
        if n - e < 2 or (e > 0 and (e + 1) * 100 > self._cfg.max_ejection_percent * n):
            return None
        count = self._decayed_count(st, now) + 1
        st.times_ejected = count
        st.until = st.healthy_since = now + min(
            self._cfg.base_ejection_s * count, self._cfg.max_ejection_s
        )
        st.failures = 0
        self._ejected[name] = st.until
        self._returned.pop(name, None)
        heapq.heappush(self._heap, (st.until, name))
        return Ejection(name, st.until, count)

    def is_ejected(self, name: str, now: float) -> bool:
        st = self._states.get(name)
        return st is not None and st.until > now

    def ejected_until(self, name: str) -> float:
        """When the current or last ejection ends (monotonic s); 0.0 if never
        ejected or unknown. For panic routing: the backend returning first."""
        st = self._states.get(name)
        return 0.0 if st is None else st.until

    def expired(self, now: float) -> list[str]:
        """Backends whose ejection has ended since the previous call, in the
        order they returned, each reported once (the pool starts their slow
        start; :meth:`ejected_until` gives the exact return time). O(1) when
        none ended, so it may be called before every pick."""
        self._reap(now)
        out = list(self._returned)
        self._returned.clear()
        return out

    def weight_factor(self, name: str) -> float:
        """Multiplier in [0.05, 1] for the backend's weight: ``median / ewma``
        when its TTFB EWMA exceeds ``latency_factor`` x the pool median, else 1.

        Only backends with ``latency_min_samples`` samples are judged or count
        toward the median, and at least two must. The median is the lower
        middle value, so a pool of two can tell its slow half (the mean of two
        values is never 3x either of them). The factor jumps from 1 to at most
        ``1 / latency_factor`` at the threshold: below it a backend is normal.
        """
        median, cfg = self._median, self._cfg
        st = self._states.get(name)
        if (
            median is None
            or st is None
            or not cfg.enabled
            or cfg.latency_factor <= 0
            or st.samples < cfg.latency_min_samples
            or st.ewma <= cfg.latency_factor * median
        ):
            return 1.0
        return max(MIN_WEIGHT_FACTOR, median / st.ewma)

    def latency_outliers(self) -> set[str]:
        """Names whose weight is currently cut for latency (admin; O(n))."""
        return {n for n in self._states if self.weight_factor(n) < 1.0}

    def snapshot(self, name: str, now: float) -> OutlierSnapshot:
        """State of one known backend for the admin API; KeyError if unknown."""
        st = self._states[name]
        remaining = st.until - now
        return {
            "consecutive_failures": st.failures,
            "ejected": remaining > 0,
            "ejected_until_in_s": max(0.0, remaining),
            "times_ejected": self._decayed_count(st, now),
            "ttfb_ewma_ms": st.ewma * 1000.0 if st.samples else None,
            "samples": st.samples,
            "weight_factor": self.weight_factor(name),
        }

    def _decayed_count(self, st: _State, now: float) -> int:
        """``times_ejected`` after one decrement per full ``max_ejection_s``
        spent un-ejected; applied lazily, so O(1)."""
        if st.times_ejected and now > st.healthy_since:
            period = self._cfg.max_ejection_s
            steps = int((now - st.healthy_since) // period)
            if steps:
                st.times_ejected = max(0, st.times_ejected - steps)
                st.healthy_since += steps * period
        return st.times_ejected

    def _reap(self, now: float) -> None:
        """Move ejections that ended by ``now`` to ``_returned``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, name = heapq.heappop(heap)
            if self._ejected.get(name) == until:
                del self._ejected[name]
                self._returned[name] = None

    def _refresh_median(self) -> None:
        min_samples = self._cfg.latency_min_samples
        judged = sorted(st.ewma for st in self._states.values() if st.samples >= min_samples)
        for st in self._states.values():
            st.baseline = st.ewma
        self._median = judged[(len(judged) - 1) // 2] if len(judged) >= 2 else None
        self._median_stale = False
        self._since_median = 0
