"""Slow start: a backend that joins the pool or returns from ejection gets a
reduced weight that ramps up over ``PoolConfig.slow_start_s``, because its
prefix (KV) cache is cold and a full share of traffic at once would queue.

The ramp is linear from ``floor`` to 1.0. Envoy shapes it with an aggression
exponent (``time_factor ** (1 / aggression)``); linear is its aggression 1.0,
and enough here. Pure functions of a monotonic ``now``; no clock is read.
"""

from __future__ import annotations

#: Share of its weight a backend gets the moment it (re)joins.
DEFAULT_FLOOR = 0.1


def slow_start_factor(elapsed_s: float, window_s: float, floor: float = DEFAULT_FLOOR) -> float:
    """Weight multiplier in [floor, 1.0] after ``elapsed_s`` seconds of a
    ``window_s``-second ramp. A window of 0 (or less) means no slow start;
    a negative elapsed time (clock skew between callers) gives ``floor``."""
    if window_s <= 0 or elapsed_s >= window_s:
        return 1.0
    if elapsed_s <= 0:
        return floor
    return floor + (1.0 - floor) * (elapsed_s / window_s)
