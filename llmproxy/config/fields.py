"""Typed reading of YAML values, with the YAML path in every complaint.

Every reader reports a bad value to :class:`Issues` and returns
:data:`INVALID`, so the caller can carry on and find the next problem instead
of stopping at the first. A value already reported, because its
interpolation failed (:data:`UNRESOLVED`) or it was missing (:data:`INVALID`),
is passed over silently, so each problem is reported once.
"""

from __future__ import annotations

import difflib
import enum
import math
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, TypeVar, get_type_hints

from llmproxy.config.env import EnvScalar, Unresolved
from llmproxy.config.errors import Issues, key_path

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")


class Invalid(enum.Enum):
    """Returned by a reader for a value it has already reported."""

    VALUE = "invalid"


INVALID = Invalid.VALUE


@dataclass(frozen=True, slots=True)
class Bound:
    """The allowed range of a number; ``None`` leaves that side open."""

    low: float | None = None
    high: float | None = None
    #: The low end itself is not allowed (``> low`` rather than ``>= low``).
    low_exclusive: bool = False

    def problem(self, number: float) -> str | None:
        low, high = self.low, self.high
        too_low = low is not None and (number <= low if self.low_exclusive else number < low)
        too_high = high is not None and number > high
        if not (too_low or too_high):
            return None
        if low is not None and high is not None:
            return f"must be between {_num(low)} and {_num(high)}, got {_num(number)}"
        if high is not None:
            return f"must be at most {_num(high)}, got {_num(number)}"
        if self.low_exclusive:
            return f"must be greater than {_num(low or 0)}, got {_num(number)}"
        return f"must be at least {_num(low or 0)}, got {_num(number)}"


_POSITIVE = Bound(0, low_exclusive=True)
_AT_LEAST_ONE = Bound(1)
_NOT_NEGATIVE = Bound(0)

#: The range of every numeric field of the schema, by field name (the names
#: mean the same thing in every section). A test checks that no numeric field
#: of the schema is missing here.
BOUNDS: Mapping[str, Bound] = types.MappingProxyType(
    {
        "port": Bound(0, 65535),
        "max_body_bytes": _AT_LEAST_ONE,
        "drain_timeout_s": _NOT_NEGATIVE,
        "keepalive_timeout_s": _POSITIVE,
        "workers": _AT_LEAST_ONE,
        "weight": _POSITIVE,
        "interval_s": _POSITIVE,
        "timeout_s": _POSITIVE,
        "healthy_threshold": _AT_LEAST_ONE,
        "unhealthy_threshold": _AT_LEAST_ONE,
        "failure_threshold": _AT_LEAST_ONE,
        "reset_timeout_s": _POSITIVE,
        "half_open_max_calls": _AT_LEAST_ONE,
        "attempts": _AT_LEAST_ONE,
        "budget_ratio": Bound(0, 1),
        "min_retries": _NOT_NEGATIVE,
        "backoff_base_s": _NOT_NEGATIVE,
        "backoff_max_s": _NOT_NEGATIVE,
        "connect_s": _POSITIVE,
        "first_byte_s": _POSITIVE,
        "idle_s": _POSITIVE,
        "total_s": _POSITIVE,
        "jitter": Bound(0, 0.9),
        "deep_interval_s": _NOT_NEGATIVE,
        "deep_timeout_s": _POSITIVE,
        "retry_after_max_s": _NOT_NEGATIVE,
        "budget_window_s": _POSITIVE,
        "consecutive_failures": _AT_LEAST_ONE,
        "base_ejection_s": _POSITIVE,
        "max_ejection_s": _POSITIVE,
        "max_ejection_percent": Bound(0, 100),
        "latency_factor": _NOT_NEGATIVE,
        "latency_min_samples": _AT_LEAST_ONE,
        "latency_alpha": Bound(0, 1, low_exclusive=True),
        "slow_start_s": _NOT_NEGATIVE,
        "max_pending": _AT_LEAST_ONE,
        "scrape_interval_s": _POSITIVE,
        "stale_after_s": _POSITIVE,
        "target_in_flight_per_replica": _POSITIVE,
        "flush_interval_s": _POSITIVE,
        "requests_per_minute": _POSITIVE,
        "tokens_per_minute": _POSITIVE,
        "max_concurrent": _AT_LEAST_ONE,
        "redis_timeout_s": _POSITIVE,
        "window_s": _POSITIVE,
        "min_samples": _AT_LEAST_ONE,
        "max_error_rate_increase": Bound(0, 1),
        "max_ttfb_p95_ratio": Bound(1),
        "step_interval_s": _POSITIVE,
        "prompt_max_chars": _NOT_NEGATIVE,
        "sample_ratio": Bound(0, 1),
        "refresh_s": _POSITIVE,
        "empty_after": _AT_LEAST_ONE,
    }
)


def _num(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def describe(value: object) -> str:
    """Name a value for a message, as the user wrote it in YAML."""
    if isinstance(value, EnvScalar):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def read_str(value: object, path: str, issues: Issues, *, non_empty: bool = True) -> str | Invalid:
    if isinstance(value, Unresolved | Invalid):
        return INVALID
    if isinstance(value, EnvScalar):
        value = value.text
    if isinstance(value, bool | int | float):
        # YAML typed it (``token: 12345``, ``x-tenant: yes``); quoting keeps it text.
        issues.add(path, f"expected a string, got {describe(value)} (quote it to make it text)")
        return INVALID
    if not isinstance(value, str):
        issues.add(path, f"expected a string, got {describe(value)}")
        return INVALID
    if non_empty and not value.strip():
        issues.add(path, "must not be empty")
        return INVALID
    return value


def read_bool(value: object, path: str, issues: Issues) -> bool | Invalid:
    if isinstance(value, Unresolved | Invalid):
        return INVALID
    plain = value.value if isinstance(value, EnvScalar) else value
    if not isinstance(plain, bool):
        issues.add(path, f"expected true or false, got {describe(plain)}")
        return INVALID
    return plain


def read_number(
    value: object, path: str, issues: Issues, *, integer: bool, bound: Bound | None = None
) -> float | int | Invalid:
    """Read an int (``integer``) or a float; an int is accepted for a float, a bool never."""
    if isinstance(value, Unresolved | Invalid):
        return INVALID
    plain = value.value if isinstance(value, EnvScalar) else value
    number: float | int
    if isinstance(plain, bool) or not isinstance(plain, int | float):
        expected = "an integer" if integer else "a number"
        issues.add(path, f"expected {expected}, got {describe(plain)}")
        return INVALID
    if integer and isinstance(plain, float):
        issues.add(path, f"expected an integer, got {describe(plain)}")
        return INVALID
    if isinstance(plain, float) and not math.isfinite(plain):
        issues.add(path, f"must be a finite number, got {plain}")
        return INVALID
    number = plain if integer else float(plain)
    problem = bound.problem(number) if bound is not None else None
    if problem is not None:
        issues.add(path, problem)
        return INVALID
    return number


def read_weight(value: object, path: str, issues: Issues) -> float | Invalid:
    """A relative weight: a finite number > 0."""
    weight = read_number(value, path, issues, integer=False, bound=BOUNDS["weight"])
    return weight if isinstance(weight, Invalid) else float(weight)


def is_null(value: object) -> bool:
    return value is None or (isinstance(value, EnvScalar) and value.value is None)


def read_mapping(value: object, path: str, issues: Issues) -> dict[str, object] | None:
    """The mapping at ``path`` with its string keys; ``None`` if it is not one."""
    if isinstance(value, Unresolved | Invalid):
        return None
    if not isinstance(value, dict):
        issues.add(path, f"expected a mapping, got {describe(value)}")
        return None
    result: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str):
            result[key] = item
        else:
            issues.add(path, f"keys must be strings, got {describe(key)}")
    return result


def read_list(value: object, path: str, issues: Issues) -> list[object] | None:
    if isinstance(value, Unresolved | Invalid):
        return None
    if not isinstance(value, list):
        issues.add(path, f"expected a list, got {describe(value)}")
        return None
    return value


def check_keys(
    data: Mapping[str, object], allowed: Collection[str], path: str, issues: Issues
) -> None:
    """Report every key of ``data`` not in ``allowed``, suggesting the likely one."""
    for key in data:
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "known: " + ", ".join(allowed)
        issues.add(key_path(path, key), f"unknown key ({hint})")


def require(data: Mapping[str, object], key: str, path: str, issues: Issues) -> object:
    """``data[key]``, or report it missing and return :data:`INVALID`."""
    if key not in data:
        issues.add(key_path(path, key), "is required")
        return INVALID
    return data[key]


def read_field(
    hint: object,
    value: object,
    path: str,
    issues: Issues,
    name: str,
    *,
    bounds: Mapping[str, Bound] = BOUNDS,
) -> object:
    """Read ``value`` for a field annotated ``hint`` (a scalar type, optionally ``| None``)."""
    args = hint.__args__ if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds = [arg for arg in args if arg is not type(None)]
    if len(kinds) != 1:
        raise TypeError(f"field {name!r}: unsupported annotation {hint!r}")
    kind = kinds[0]
    if optional and is_null(value) and not (kind is str and isinstance(value, EnvScalar)):
        return None
    if kind is str:
        return read_str(value, path, issues, non_empty=False)
    if kind is bool:
        return read_bool(value, path, issues)
    if kind is int or kind is float:
        return read_number(value, path, issues, integer=kind is int, bound=bounds.get(name))
    raise TypeError(f"field {name!r}: unsupported annotation {hint!r}")


def build_section(cls: type[_D], value: object, path: str, issues: Issues, base: _D) -> _D:
    """Build a section of scalar fields; absent keys (or a null section) keep ``base``."""
    if isinstance(value, Invalid) or is_null(value):
        return base
    data = read_mapping(value, path, issues)
    if data is None:
        return base
    return apply_fields(cls, data, path, issues, base)


def apply_fields(
    cls: type[_D],
    data: Mapping[str, object],
    path: str,
    issues: Issues,
    base: _D,
    *,
    bounds: Mapping[str, Bound] = BOUNDS,
) -> _D:
    """Like :func:`build_section`, for a mapping already read.

    ``bounds`` replaces :data:`BOUNDS` for a section whose field means less
    there than elsewhere (a discovered ``port`` cannot be 0).
    """
    names = [f.name for f in fields(cls)]
    check_keys(data, names, path, issues)
    hints = get_type_hints(cls)
    changes: dict[str, object] = {}
    for name in names:
        if name in data:
            read = read_field(
                hints[name], data[name], key_path(path, name), issues, name, bounds=bounds
            )
            if not isinstance(read, Invalid):
                changes[name] = read
    return replace(base, **changes)
