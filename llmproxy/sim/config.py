"""Settings of the simulated replica.

Unlike the gateway's frozen configuration, :class:`SimConfig` is mutable on
purpose: ``POST /sim/faults`` changes its fault fields while the replica runs,
and every request reads them afresh. Times are milliseconds (``*_ms``), rates
are tokens per second, shares are in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class SimConfig:
    host: str = "127.0.0.1"
    #: 0 lets the OS choose; the chosen port is printed on start.
    port: int = 0
    model: str = "sim-model"
    #: Time to first token, before ``slow_factor``.
    ttft_ms: float = 50.0
    #: Decode speed; 0 means no delay between tokens.
    tokens_per_s: float = 50.0
    #: Requests generating at once; beyond it they wait in FIFO order. 0 = no cap.
    max_concurrency: int = 0
    #: Completion length when the request sets no ``max_tokens``.
    max_tokens_default: int = 16
    # -- faults (switchable at run time) ------------------------------------
    #: Share of generation requests answered with ``error_status``.
    error_rate: float = 0.0
    error_status: int = 500
    #: Generation requests are read and validated, then never answered.
    hang: bool = False
    #: Multiplies the time to first token and the gap between tokens.
    slow_factor: float = 1.0
    #: Close the connection after this many tokens, without a proper ending.
    cut_after_tokens: int | None = None
    #: ``/health`` answers 503.
    unhealthy: bool = False
    #: Seed of the random source that decides which requests fail.
    seed: int | None = None


def _number(value: object) -> float | None:
    """``value`` as a float if it is a JSON number (booleans are not numbers)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _share(value: object) -> bool:
    number = _number(value)
    return number is not None and 0.0 <= number <= 1.0


def _non_negative(value: object) -> bool:
    number = _number(value)
    return number is not None and number >= 0.0


def _http_error_status(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599


def _optional_count(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _flag(value: object) -> bool:
    return isinstance(value, bool)


#: The fields ``/sim/faults`` may change, each with its check and what it expects.
FAULT_FIELDS: Mapping[str, tuple[Callable[[object], bool], str]] = {
    "error_rate": (_share, "a number in [0, 1]"),
    "error_status": (_http_error_status, "an integer in [400, 599]"),
    "hang": (_flag, "a boolean"),
    "slow_factor": (_non_negative, "a number >= 0"),
    "cut_after_tokens": (_optional_count, "an integer >= 0 or null"),
    "unhealthy": (_flag, "a boolean"),
    "ttft_ms": (_non_negative, "a number >= 0"),
    "tokens_per_s": (_non_negative, "a number >= 0"),
}


_FLOAT_FIELDS = frozenset({"error_rate", "slow_factor", "ttft_ms", "tokens_per_s"})


def faults_of(cfg: SimConfig) -> dict[str, Any]:
    """The current value of every run-time switchable field."""
    return {name: getattr(cfg, name) for name in FAULT_FIELDS}


def apply_faults(cfg: SimConfig, updates: Mapping[str, object]) -> None:
    """Set the given fault fields on ``cfg``, all or none.

    Raises ``ValueError`` naming the first unknown field or bad value; ``cfg``
    is left untouched in that case.
    """
    for name, value in updates.items():
        check = FAULT_FIELDS.get(name)
        if check is None:
            known = ", ".join(FAULT_FIELDS)
            raise ValueError(f"unknown fault field {name!r} (known: {known})")
        valid, expected = check
        if not valid(value):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    for name, value in updates.items():
        setattr(cfg, name, _number(value) if name in _FLOAT_FIELDS else value)
