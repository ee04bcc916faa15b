"""``llmproxy status``: the admin API's state as terminal tables, like ``kubectl get``.

Plain blocking stdlib HTTP: a one-shot command (or a slow redraw loop) has
no use for an event loop. Every failure an operator can cause (wrong URL,
gateway down, wrong token) ends in one line on stderr and exit code 1, never
a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

#: Move the cursor home and clear the screen (ANSI), before each redraw.
CLEAR = "\x1b[H\x1b[2J"
TOKEN_ENV = "LLMPROXY_ADMIN_TOKEN"
#: Most serious first; the status page uses the same order.
_STATUS_ORDER = ("down", "open", "ejected", "half-open", "draining")
_COLOURS = {
    "up": "\x1b[32m",
    "down": "\x1b[31;1m",
    "open": "\x1b[31m",
    "ejected": "\x1b[33m",
    "half-open": "\x1b[33m",
    "draining": "\x1b[34m",
}
_RESET = "\x1b[0m"
BACKEND_COLUMNS = (
    "POOL", "BACKEND", "STATUS", "HEALTH", "BREAKER", "EJECTED", "INFLIGHT", "WEIGHT", "EFF",
    "TTFB(ms)", "FAILS", "DETAIL",
)  # fmt: skip


class StatusError(Exception):
    """A problem worth one line to the operator (no traceback)."""


class Unauthorized(StatusError):
    """The token is missing or wrong: retrying will not help."""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default="http://127.0.0.1:8081",
        help="admin listener URL (default: %(default)s)",
    )
    parser.add_argument("--token", default=None, help=f"admin token (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=_positive_seconds,
        metavar="SECONDS",
        help="redraw every SECONDS (2 if not given) until Ctrl-C",
    )
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=5.0, help="HTTP timeout in seconds"
    )


def _admin_base(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def fetch_state(admin: str, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``/admin/state``; raises :class:`StatusError` with a readable message."""
    url = f"{_admin_base(admin)}/admin/state"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = "wrong admin token" if token else f"a token is needed (--token or ${TOKEN_ENV})"
            raise Unauthorized(f"{url}: 401 unauthorized: {hint}") from None
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach the admin API at {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        raise StatusError(f"cannot reach the admin API at {url}: {exc}") from None
    try:
        state = json.loads(body)
    except ValueError:
        raise StatusError(f"{url} did not answer JSON; is this the admin listener?") from None
    if not isinstance(state, dict) or "pools" not in state:
        raise StatusError(f"{url} did not answer a gateway state; is this the admin listener?")
    return state


def backend_status(b: dict[str, Any]) -> str:
    """The most serious condition that holds (see ``_STATUS_ORDER``), else ``up``."""
    breaker = (b.get("breaker") or {}).get("state", "closed")
    holds = {
        "down": not b.get("healthy", True),
        "open": breaker == "open",
        "ejected": bool((b.get("outlier") or {}).get("ejected")),
        "half-open": breaker == "half_open",
        "draining": bool(b.get("draining")),
    }
    return next((s for s in _STATUS_ORDER if holds[s]), "up")


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    paint: Callable[[int, str, str], str] | None = None,
) -> str:
    """Columns padded to their widest cell, three spaces apart, the last one
    unpadded. ``paint(column, cell, padded)`` may wrap a padded cell in
    colour codes after the widths were measured on the plain text."""
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    lines = []
    for row in (headers, *rows):
        cells = []
        for i, cell in enumerate(row):
            padded = cell if i == len(row) - 1 else cell.ljust(widths[i])
            cells.append(paint(i, cell, padded) if paint and row is not headers else padded)
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}" if digits else str(round(float(value)))


def _backend_row(pool: str, b: dict[str, Any]) -> list[str]:
    breaker = b.get("breaker") or {}
    outlier = b.get("outlier") or {}
    detail = [b.get("health_detail") or ""]
    if b.get("slow_start"):
        detail.append("slow start")
    if b.get("draining"):
        detail.append("draining")
    if breaker.get("opened_for_s") is not None:
        detail.append(f"breaker open {breaker['opened_for_s']:.0f}s")
    ejected = f"{outlier.get('ejected_until_in_s', 0):.1f}s" if outlier.get("ejected") else "no"
    return [
        pool,
        str(b.get("name", "?")),
        backend_status(b),
        "healthy" if b.get("healthy", True) else "unhealthy",
        str(breaker.get("state", "closed")).replace("_", "-"),
        ejected,
        _num(b.get("in_flight")),
        _num(b.get("weight")),
        _num(b.get("effective_weight"), 2),
        _num(outlier.get("ttfb_ewma_ms"), 1),
        _num(outlier.get("consecutive_failures")),
        "; ".join(d for d in detail if d) or "-",
    ]


def render_state(state: dict[str, Any], *, colour: bool = False) -> str:
    """The whole state as text: gateway line, pools, backends, routes."""
    reload = state.get("last_reload") or {}
    at = reload.get("at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "never"
    parts = [
        f"gateway: {'ready' if state.get('ready') else 'NOT READY'}"
        f"{', DRAINING' if state.get('draining') else ''}"
        f"   config: {state.get('config_source') or '(inline)'}"
        f"   last reload: {'ok' if reload.get('ok', True) else 'FAILED'} ({when})",
    ]
    parts += [f"  reload error: {e}" for e in reload.get("errors") or []]
    pools = state.get("pools") or {}
    pool_rows = []
    backend_rows = []
    for name, pool in pools.items():
        backends = pool.get("backends") or []
        budget = pool.get("retry_budget") or {}
        pool_rows.append([
            name,
            str(pool.get("balancer", "?")),
            f"{pool.get('eligible', 0)}/{len(backends)}",
            f"{_num(budget.get('retries'))}/{_num(budget.get('requests'))}"
            + ("" if budget.get("allowed_now", True) else " exhausted"),
        ])  # fmt: skip
        backend_rows += [_backend_row(name, b) for b in backends]

    def paint(column: int, cell: str, padded: str) -> str:
        if colour and column == 2 and cell in _COLOURS:
            return f"{_COLOURS[cell]}{padded}{_RESET}"
        return padded

    parts += ["", format_table(("POOL", "BALANCER", "ELIGIBLE", "RETRIES/REQUESTS"), pool_rows)]
    parts += ["", format_table(BACKEND_COLUMNS, backend_rows, paint)]
    route_rows = []
    for r in state.get("routes") or []:
        split = r.get("split") or []
        total = sum(t.get("weight", 0) for t in split) or 1
        route_rows.append([
            str(r.get("name", "?")),
            ",".join(f"{t['pool']}={100 * t.get('weight', 0) / total:g}%" for t in split),
            ",".join(r.get("fallback") or []) or "-",
            str(r.get("sticky") or "none"),
        ])  # fmt: skip
    if route_rows:
        parts += ["", format_table(("ROUTE", "SPLIT", "FALLBACK", "STICKY"), route_rows)]
    return "\n".join(parts) + "\n"


def run_status(
    ns: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the state once, or redraw it every ``ns.watch`` seconds.

    ``iterations`` bounds the redraws (tests); Ctrl-C ends a watch with 0.
    In a watch, a gateway that stops answering is shown as an error frame
    and polled again (it may be restarting); a wrong token ends it with 1.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    token = ns.token if ns.token is not None else os.environ.get(TOKEN_ENV)
    watch: float | None = ns.watch
    colour = out.isatty() and "NO_COLOR" not in os.environ
    drawn = 0
    try:
        while True:
            try:
                text = render_state(fetch_state(ns.admin, token, ns.timeout), colour=colour)
            except StatusError as exc:
                if watch is None or drawn == 0 or isinstance(exc, Unauthorized):
                    print(f"llmproxy status: {exc}", file=err)
                    return 1
                text = f"error: {exc}\n"
            if watch is not None:
                stamp = time.strftime("%H:%M:%S")
                out.write(f"{CLEAR}every {watch:g}s: {_admin_base(ns.admin)}   {stamp}\n\n")
            out.write(text)
            out.flush()
            drawn += 1
            if watch is None or (iterations is not None and drawn >= iterations):
                return 0
            sleep(watch)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 0 if watch is not None else 130
