"""Active health checking: poll every backend of a pool, with hysteresis.

:class:`HealthChecker` knows nothing of pools: it reads its backends from a
``targets`` callable (anything shaped like :class:`CheckTarget`) and reports
through two callbacks, ``on_result`` after every probe and ``on_transition``
when a backend's :class:`~llmproxy.health.hysteresis.Hysteresis` flips. The
caller turns those into backend state, metrics and logs; this module logs
only at DEBUG, and never a URL (it may carry credentials).

Probes. Each backend has its own task, named ``health:<name>``, that sends
``GET base_url + cfg.path`` every ``interval_s`` (stretched or shrunk by up to
``jitter``); a 2xx passes, anything else, a connect error or a timeout fails.
The first probe comes at a random point of the first interval, so the backends
of a pool (and pools of several gateways) do not probe in step.

Deep check (``cfg.deep_interval_s > 0``): on its own schedule, a one-token
completion, skipped while the backend has requests in flight -- real traffic
already proves the GPU, and a check must never compete with users (FIELD-NOTES
item 8). Its failure counts as a failed probe. While the latest deep check
failed, passes of the shallow probe are reported but not counted, and the deep
check is retried every ``interval_s``: otherwise a ``/health`` that answers 200
while generation is broken would reset the failure streak between two deep
checks, and the backend would never go down. A deep pass only lifts that
latch; it is not counted as a pass, so it cannot bring back a backend whose
``/health`` fails.

Start-up: a backend is presumed healthy until probes prove otherwise, so a
gateway serves from its first second instead of refusing everything for
``interval_s * healthy_threshold``; a dead backend is then caught by the
probes, and by the retries and outlier detection of real requests.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import yarl

from llmproxy.config.schema import HealthConfig
from llmproxy.health.hysteresis import Hysteresis

log = logging.getLogger(__name__)

#: ``(backend name, passed, detail)``, after every probe (deep ones: "deep: ...").
ResultCallback = Callable[[str, bool, str], None]
#: ``(backend name, now_healthy, reason)``, when the hysteresis flips.
TransitionCallback = Callable[[str, bool, str], None]

TASK_PREFIX = "health:"


class CheckTarget(Protocol):
    """What the checker needs of a backend."""

    @property
    def name(self) -> str: ...
    @property
    def base_url(self) -> yarl.URL: ...
    @property
    def in_flight(self) -> int:
        """Requests of user traffic now in flight to this backend."""
        ...


class _ProbeError(Exception):
    """A probe failed for a reason already phrased for the detail."""


@dataclass(slots=True, eq=False)
class _Backend:
    target: CheckTarget
    #: ``str(target.base_url)`` when first seen: a new URL under the same name
    #: is a new backend, with a fresh state.
    url: str
    hysteresis: Hysteresis
    task: asyncio.Task[None] | None = None
    last_result: bool | None = None
    last_detail: str = ""
    last_checked: float | None = None
    deep_failing: bool = False
    deep_checks: int = 0
    deep_skipped: int = 0


class HealthChecker:
    """Probes the backends ``targets()`` returns until :meth:`run` is cancelled.

    ``rng`` drives the jitter and first-probe offsets; ``clock`` (seconds,
    monotonic; default :func:`time.monotonic`) only stamps results for
    :meth:`snapshot`. The waits between probes are real ``asyncio.sleep``.
    """

    def __init__(
        self,
        *,
        targets: Callable[[], Sequence[CheckTarget]],
        cfg: HealthConfig,
        session: aiohttp.ClientSession,
        rng: random.Random,
        on_result: ResultCallback,
        on_transition: TransitionCallback,
        clock: Callable[[], float] | None = None,
        initially_healthy: bool = True,
    ) -> None:
        self._targets = targets
        self._cfg = cfg
        self._session = session
        self._rng = rng
        self._on_result = on_result
        self._on_transition = on_transition
        self._clock = clock or time.monotonic
        self._initially_healthy = initially_healthy
        self._backends: dict[str, _Backend] = {}
        #: Tasks of removed backends, cancelled but perhaps not finished yet.
        self._retiring: set[asyncio.Task[None]] = set()

    # -- state -----------------------------------------------------------------

    def healthy(self, name: str) -> bool:
        """The backend's state; a backend not (yet) checked is as presumed."""
        backend = self._backends.get(name)
        return backend.hysteresis.healthy if backend else self._initially_healthy

    def snapshot(self, name: str) -> dict[str, Any]:
        """State for the admin API; ``consecutive`` is the current streak of
        counted results (failures if the latest counted one failed)."""
        b = self._backends.get(name)
        if b is None:
            return {
                "healthy": self._initially_healthy,
                "last_result": None,
                "last_detail": "",
                "last_checked_ago_s": None,
                "consecutive": 0,
                "deep_failing": False,
                "deep_checks": 0,
                "deep_skipped": 0,
            }
        h = b.hysteresis
        ago = None if b.last_checked is None else max(0.0, self._clock() - b.last_checked)
        return {
            "healthy": h.healthy,
            "last_result": b.last_result,
            "last_detail": b.last_detail,
            "last_checked_ago_s": ago,
            "consecutive": h.consecutive_passes or h.consecutive_failures,
            "deep_failing": b.deep_failing,
            "deep_checks": b.deep_checks,
            "deep_skipped": b.deep_skipped,
        }

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Probe until cancelled; re-read ``targets()`` every ``interval_s``.

        Owns one task per backend and cancels and awaits them all when it is
        cancelled. With ``cfg.enabled`` false it probes nothing.
        """
        try:
            if not self._cfg.enabled:
                await asyncio.get_running_loop().create_future()
            while True:
                self._reconcile()
                await asyncio.sleep(self._cfg.interval_s)
        finally:
            tasks = {b.task for b in self._backends.values() if b.task} | self._retiring
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for b in self._backends.values():
                b.task = None

    def _reconcile(self) -> None:
        try:
            current = {t.name: t for t in self._targets()}
        except Exception:
            log.exception("health: reading the backends failed; keeping the previous ones")
            return
        for name in self._backends.keys() - current.keys():
            self._drop(name)
        for name, target in current.items():
            b = self._backends.get(name)
            if b is not None and str(target.base_url) != b.url:
                self._drop(name)
                b = None
            if b is None:
                b = _Backend(target, str(target.base_url), self._new_hysteresis(target))
                self._backends[name] = b
            b.target = target
            if b.task is None or b.task.done():
                if b.task is not None and not b.task.cancelled() and b.task.exception():
                    log.error("health: task of %s died; restarting it", name)
                b.task = asyncio.create_task(self._watch(b), name=f"{TASK_PREFIX}{name}")

    def _new_hysteresis(self, target: CheckTarget) -> Hysteresis:
        """Start from the target's own verdict when it has one: a backend added
        by a reload is held out until it passes its checks, while the backends
        a gateway starts with are presumed healthy so it serves at once."""
        cfg = self._cfg
        initially = getattr(target, "healthy", self._initially_healthy)
        return Hysteresis(cfg.healthy_threshold, cfg.unhealthy_threshold, bool(initially))

    def _drop(self, name: str) -> None:
        b = self._backends.pop(name)
        if b.task is not None and not b.task.done():
            b.task.cancel()
            self._retiring.add(b.task)
            b.task.add_done_callback(self._retiring.discard)

    # -- schedules -------------------------------------------------------------

    async def _watch(self, b: _Backend) -> None:
        if self._cfg.deep_interval_s <= 0:
            await self._every(self._cfg.interval_s, b, self._shallow)
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._every(self._cfg.interval_s, b, self._shallow))
            group.create_task(self._every(self._cfg.deep_interval_s, b, self._deep))

    async def _every(
        self, interval: float, b: _Backend, step: Callable[[_Backend], Awaitable[float]]
    ) -> None:
        """Run ``step`` at a random offset, then after each delay it returns."""
        delay = self._rng.uniform(0.0, interval)
        while True:
            await asyncio.sleep(delay)
            try:
                base = await step(b)
            except Exception:  # an isolation boundary: the next probe still runs
                log.exception("health: probing %s failed unexpectedly", b.target.name)
                base = interval
            delay = max(0.0, base * (1.0 + self._cfg.jitter * self._rng.uniform(-1.0, 1.0)))

    async def _shallow(self, b: _Backend) -> float:
        passed, detail = await self._probe_health(b.target)
        self._record(b, passed, detail, counted=not (passed and b.deep_failing))
        return self._cfg.interval_s

    async def _deep(self, b: _Backend) -> float:
        retry = self._cfg.interval_s if b.deep_failing else self._cfg.deep_interval_s
        if b.target.in_flight > 0:
            b.deep_skipped += 1
            log.debug("health %s: deep check skipped, requests in flight", b.target.name)
            return retry
        b.deep_checks += 1
        passed, detail = await self._probe_generation(b.target)
        b.deep_failing = not passed
        self._record(b, passed, f"deep: {detail}", counted=not passed)
        return self._cfg.deep_interval_s if passed else self._cfg.interval_s

    def _record(self, b: _Backend, passed: bool, detail: str, *, counted: bool) -> None:
        name = b.target.name
        b.last_result, b.last_detail, b.last_checked = passed, detail, self._clock()
        flipped = b.hysteresis.observe(passed) if counted else None
        log.debug("health %s: %s (%s)", name, "pass" if passed else "fail", detail)
        _notify(self._on_result, name, passed, detail)
        if flipped is not None:
            _notify(self._on_transition, name, flipped, detail)

    # -- probes ----------------------------------------------------------------

    async def _probe_health(self, target: CheckTarget) -> tuple[bool, str]:
        timeout_s = self._cfg.timeout_s
        url = _join(target.base_url, self._cfg.path)
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
            ) as resp:
                await resp.read()
                return _verdict(resp.status)
        except Exception as exc:  # any failure to get a 2xx is the backend's failure
            return False, _describe(exc, timeout_s)

    async def _probe_generation(self, target: CheckTarget) -> tuple[bool, str]:
        cfg = self._cfg
        timeout = aiohttp.ClientTimeout(total=cfg.deep_timeout_s)
        try:
            async with asyncio.timeout(cfg.deep_timeout_s):
                model = cfg.deep_model or await self._first_model(target, timeout)
                body = {"model": model, "prompt": "ping", "max_tokens": 1}
                url = _join(target.base_url, cfg.deep_path)
                async with self._session.post(url, json=body, timeout=timeout) as resp:
                    await resp.read()
                    return _verdict(resp.status)
        except Exception as exc:  # as in _probe_health
            return False, _describe(exc, cfg.deep_timeout_s)

    async def _first_model(self, target: CheckTarget, limit: aiohttp.ClientTimeout) -> str:
        url = _join(target.base_url, "/v1/models")
        async with self._session.get(url, timeout=limit) as resp:
            if not 200 <= resp.status < 300:
                raise _ProbeError(f"/v1/models: HTTP {resp.status}")
            listing = await resp.json(content_type=None)
        data = listing.get("data") if isinstance(listing, dict) else None
        first = data[0] if isinstance(data, list) and data else None
        model = first.get("id") if isinstance(first, dict) else None
        if not isinstance(model, str) or not model:
            raise _ProbeError("/v1/models lists no model")
        return model


def _notify(callback: Callable[[str, bool, str], None], name: str, ok: bool, text: str) -> None:
    """Call a callback of the owner; its failure must not stop the checks."""
    try:
        callback(name, ok, text)
    except Exception:
        log.exception("health: a callback failed for %s", name)


def _join(base: yarl.URL, path: str) -> yarl.URL:
    """``base`` (which may have a path prefix) followed by ``path``."""
    return yarl.URL(str(base).rstrip("/") + "/" + path.lstrip("/"))


def _verdict(status: int) -> tuple[bool, str]:
    return 200 <= status < 300, f"HTTP {status}"


def _describe(exc: Exception, timeout_s: float) -> str:
    """A short reason for a failed probe. Never the URL or the message of an
    aiohttp error, which may quote the URL and any credentials in it."""
    if isinstance(exc, TimeoutError):
        return f"timeout after {float(timeout_s)}s"
    if isinstance(exc, _ProbeError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "connect error: name not resolved"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
            return "connect refused"
        return f"connect error: {os_error.strerror or type(os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
