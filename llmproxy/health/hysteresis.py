"""Health hysteresis: thresholds of consecutive results, as Envoy's health checker.

A backend goes down after ``unhealthy_threshold`` consecutive failed probes
and comes back after ``healthy_threshold`` consecutive passes. A pass ends a
run of failures and a failure ends a run of passes, so a backend that
alternates (pass, fail, pass, fail) never changes state when both thresholds
are above one: a flapping replica is neither trusted again nor thrown out on
one result.

Unlike Envoy, a backend first seen does not come up on its first pass: the
checker presumes new backends healthy instead (see
:mod:`llmproxy.health.checker`), and one started down must earn
``healthy_threshold`` passes like any other.

Pure and synchronous: no clock, no I/O.
"""

from __future__ import annotations


class Hysteresis:
    """The health state of one backend, fed one probe result at a time."""

    __slots__ = ("_failures", "_healthy", "_healthy_threshold", "_passes", "_unhealthy_threshold")

    def __init__(
        self, healthy_threshold: int, unhealthy_threshold: int, initially_healthy: bool = True
    ) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError(
                "health thresholds must be at least 1, got "
                f"healthy={healthy_threshold}, unhealthy={unhealthy_threshold}"
            )
        self._healthy_threshold = healthy_threshold
        self._unhealthy_threshold = unhealthy_threshold
        self._healthy = initially_healthy
        self._passes = 0
        self._failures = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def consecutive_passes(self) -> int:
        """Passes since the last failure (0 right after a failure)."""
        return self._passes

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last pass (0 right after a pass)."""
        return self._failures

    def observe(self, passed: bool) -> bool | None:
        """Count one probe result; the new state if it flips, else ``None``.

        The streaks keep counting after a flip, but a flip happens only on the
        probe that reaches the threshold, never again while the state holds.
        """
        if passed:
            self._passes += 1
            self._failures = 0
            if not self._healthy and self._passes >= self._healthy_threshold:
                self._healthy = True
                return True
        else:
            self._failures += 1
            self._passes = 0
            if self._healthy and self._failures >= self._unhealthy_threshold:
                self._healthy = False
                return False
        return None

    def __repr__(self) -> str:
        state = "healthy" if self._healthy else "unhealthy"
        return f"<Hysteresis {state} passes={self._passes} failures={self._failures}>"
