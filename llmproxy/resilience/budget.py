"""A retry budget: retries may be at most a share of recent requests.

Modelled on Envoy's retry budget (``budget_percent`` plus
``min_retry_concurrency``), counted over a sliding time window instead of
over requests in flight. Without it, a pool where every backend is failing
multiplies its own load by ``attempts``; with it, retries stay within
``ratio`` of the traffic, plus ``min_retries`` so that a quiet pool can still
retry at all.

The window is a ring of time buckets (about one second wide), so each call
is O(1) amortised and memory does not grow with traffic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import TypedDict


class BudgetSnapshot(TypedDict):
    #: Client requests and retries counted in the current window.
    requests: int
    retries: int
    #: Retries ``try_spend()`` would allow right now, one after another.
    allowed_now: int


class RetryBudget:
    """Allows a retry iff ``retries < ratio * requests + min_retries``, both
    counted over the last ``window_s`` seconds (to within one bucket).

    ``ratio`` is taken as the decimal written in the config (0.2 is 1/5, not
    the nearest binary float), and the comparison is in integers, so 100
    requests at 0.2 with ``min_retries`` 3 allow exactly 23 retries.
    """

    def __init__(
        self, ratio: float, min_retries: int, window_s: float, clock: Callable[[], float]
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0 and min_retries >= 0 and window_s > 0):
            msg = "ratio must be finite and >= 0, min_retries >= 0, window_s > 0"
            raise ValueError(msg)
        frac = Fraction(repr(float(ratio))).limit_denominator(1_000_000)
        self._num = frac.numerator
        self._den = frac.denominator
        self._min = min_retries
        self._clock = clock
        self._n = max(1, math.ceil(window_s))
        #: Bucket width in seconds: ``window_s`` split into ``_n`` equal parts.
        self._width = window_s / self._n
        self._requests = [0] * self._n
        self._retries = [0] * self._n
        self._req_total = 0
        self._ret_total = 0
        #: Absolute index (time // width) of the newest bucket.
        self._head = math.floor(clock() / self._width)

    def _slot(self) -> int:
        """Expire buckets that left the window; return the current slot."""
        idx = math.floor(self._clock() / self._width)
        steps = idx - self._head
        if steps > 0:
            if steps >= self._n:
                self._requests = [0] * self._n
                self._retries = [0] * self._n
                self._req_total = self._ret_total = 0
            else:
                for k in range(self._head + 1, idx + 1):
                    s = k % self._n
                    self._req_total -= self._requests[s]
                    self._ret_total -= self._retries[s]
                    self._requests[s] = self._retries[s] = 0
            self._head = idx
        return self._head % self._n

    def record_request(self) -> None:
        """Count one client request that reached the pool (not its retries)."""
        s = self._slot()
        self._requests[s] += 1
        self._req_total += 1

    def _allowed(self) -> int:
        # retries r allowed while r < num/den * requests + min, i.e. while
        # r < ceil(num * requests / den) + min.
        limit = -(-self._num * self._req_total // self._den) + self._min
        return max(0, limit - self._ret_total)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing counted) if spent."""
        s = self._slot()
        if self._allowed() <= 0:
            return False
        self._retries[s] += 1
        self._ret_total += 1
        return True

    def snapshot(self) -> BudgetSnapshot:
        """For the admin API."""
        self._slot()
        return {
            "requests": self._req_total,
            "retries": self._ret_total,
            "allowed_now": self._allowed(),
        }
