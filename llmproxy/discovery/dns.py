"""DNS service discovery: a pool's backends are the addresses a name resolves to.

On Kubernetes the name is a headless Service (``clusterIP: None``): it resolves
to the IPs of the pods that are *ready*, so re-resolving it every ``refresh_s``
follows scale-ups, scale-downs and rolling updates. This module only works out
the desired backend list and hands it to ``on_change``; the caller applies it
through the reload path, where new backends join health-checked and in slow
start and vanished ones are drained, not cut.

What a lookup can tell, and what is done with it:

- **Addresses**: applied at once when they differ from the current set (as a
  set: order and duplicates do not matter).
- **No addresses** (NXDOMAIN or NODATA -- what CoreDNS answers for a headless
  Service with no ready pod, i.e. a real scale to zero): applied only after
  ``empty_after`` such answers in a row. A scale to zero is legitimate, but a
  DNS blip that answers NXDOMAIN once would otherwise drain the whole pool.
- **A failure** (timeout, SERVFAIL, resolver unreachable, anything the
  resolver raises): the last good set stays, :attr:`DnsDiscovery.last_error`
  says why, and a warning is logged once per streak of failures (plus one line
  when lookups work again). Failures neither count towards nor reset the
  empty-answer streak: they say nothing about the name.

Backends are named ``ip:port`` (``[ip]:port`` for IPv6), the same form a
static backend gets by default, so metrics and admin URLs look alike.

Configuration: ``pools.NAME.discovery``
(:class:`~llmproxy.config.schema.DiscoveryConfig`). The jitter of the refresh
interval and the address family are constructor arguments.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from llmproxy.config.schema import BackendConfig, DiscoveryConfig

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Receives the whole desired backend list whenever it changes.
ChangeCallback = Callable[[list[BackendConfig]], None]
Sleep = Callable[[float], Awaitable[None]]

#: ``any``, ``ipv4`` or ``ipv6``. On a dual-stack cluster a headless Service
#: answers both A and AAAA for each pod; ``any`` would then count every pod twice.
IP_FAMILIES = ("any", "ipv4", "ipv6")
#: Default share by which each refresh interval is stretched or shrunk at
#: random, so that many gateways do not query in step.
DEFAULT_JITTER = 0.1


# -- resolving -----------------------------------------------------------------


class Resolver(Protocol):
    """Turns a name into IP addresses.

    Returns ``[]`` when the name has no address (NXDOMAIN, NODATA); raises for
    anything that leaves the answer unknown (timeout, SERVFAIL, no resolver).
    The difference matters: see the module docstring.
    """

    async def resolve(self, name: str) -> list[str]: ...


#: getaddrinfo's "the name has no address" codes; the rest mean "unknown".
_NO_ADDRESS = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


class SystemResolver:
    """The operating system's resolver (``getaddrinfo`` in the loop's
    executor), so ``/etc/hosts``, ``resolv.conf`` search domains and ``ndots``
    apply exactly as for every other program in the pod."""

    async def resolve(self, name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                name, None, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            if exc.errno in _NO_ADDRESS:
                return []
            raise
        return [str(ip) for ip in _normalise(str(info[4][0]) for info in infos)]


def _normalise(addresses: Iterable[str]) -> list[IpAddress]:
    """Parsed, deduplicated, sorted (IPv4 first). Addresses with an IPv6 zone
    (link-local, ``fe80::1%eth0``) are dropped: they only mean something on
    one interface of one host, never a replica of a Service."""
    unique: set[IpAddress] = set()
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            log.debug("discovery: ignoring %r, not an IP address", text)
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            continue
        unique.add(ip)
    return sorted(unique, key=lambda ip: (ip.version, int(ip)))


def backend_for(ip: IpAddress, cfg: DiscoveryConfig) -> BackendConfig:
    """The backend a discovered address becomes: weight 1, named ``ip:port``."""
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    host_port = f"{host}:{cfg.port}"
    return BackendConfig(url=f"{cfg.scheme}://{host_port}", weight=1.0, name=host_port)


# -- the runner ----------------------------------------------------------------


class DnsDiscovery:
    """Follows one DNS name and reports the pool's desired backends.

    Use :meth:`resolve_once` at start-up to get the backends the pool is built
    with, then run :meth:`run` as a task owned by the pool's owner, which
    cancels and awaits it on shutdown. :meth:`refresh` is one step of
    :meth:`run`, for tests and for an admin "resolve now".

    ``on_change`` is called from the event loop with the complete new list
    (sorted by address) and never with an unchanged one. If it raises, the
    error is logged and the same list is offered again at the next refresh,
    so it should apply all or nothing. ``clock`` (monotonic seconds) only
    stamps :meth:`snapshot`; ``rng`` drives the jitter; ``sleep`` is the wait
    between lookups (injected by tests). ``jitter`` is a share of
    ``refresh_s`` (0..0.9); ``ip_family`` one of :data:`IP_FAMILIES`.
    """

    def __init__(
        self,
        cfg: DiscoveryConfig,
        resolver: Resolver,
        on_change: ChangeCallback,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        jitter: float = DEFAULT_JITTER,
        ip_family: str = "any",
        pool: str = "",
    ) -> None:
        if ip_family not in IP_FAMILIES:
            raise ValueError(f"ip_family must be one of {', '.join(IP_FAMILIES)}: {ip_family!r}")
        if not 0 <= jitter <= 0.9:
            raise ValueError(f"jitter must be between 0 and 0.9: {jitter}")
        self._cfg = cfg
        self._jitter = jitter
        self._ip_family = ip_family
        self._resolver = resolver
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._label = f"pool {pool!r}: {cfg.dns}" if pool else cfg.dns
        self._current: tuple[IpAddress, ...] = ()
        self._empty_streak = 0
        self._failure_streak = 0
        self._failures_total = 0
        self._last_error: str | None = None
        self._last_success_at: float | None = None
        self._last_error_at: float | None = None

    # -- state -----------------------------------------------------------------

    @property
    def backends(self) -> list[BackendConfig]:
        """The backend list last applied (or returned by :meth:`resolve_once`)."""
        return [backend_for(ip, self._cfg) for ip in self._current]

    @property
    def last_error(self) -> str | None:
        """Why the latest lookup failed; ``None`` once a lookup works again."""
        return self._last_error

    @property
    def consecutive_failures(self) -> int:
        return self._failure_streak

    def snapshot(self) -> dict[str, Any]:
        """State for the admin API and the status page."""
        return {
            "dns": self._cfg.dns,
            "port": self._cfg.port,
            "addresses": [str(ip) for ip in self._current],
            "last_error": self._last_error,
            "consecutive_failures": self._failure_streak,
            "failures_total": self._failures_total,
            "empty_answers_in_a_row": self._empty_streak,
            "last_success_at": self._last_success_at,
            "last_error_at": self._last_error_at,
        }

    # -- lookups ---------------------------------------------------------------

    async def resolve_once(self) -> list[BackendConfig]:
        """Start-up: one lookup, taken as the current set without calling
        ``on_change`` (the caller builds the pool from the result).

        There is no last good set to protect yet, so an empty answer counts at
        once; a failure gives ``[]`` (the pool starts empty, :meth:`run` keeps
        trying) rather than an exception that would stop the gateway because
        of a DNS hiccup.
        """
        answer = await self._lookup()
        if answer is not None:
            self._current = tuple(answer)
        return self.backends

    async def refresh(self) -> bool:
        """One lookup, applied by the rules of the module docstring; True when
        ``on_change`` was called and accepted the new list."""
        answer = await self._lookup()
        if answer is None:
            return False
        if not answer:
            if not self._current:
                return False
            self._empty_streak += 1
            if self._empty_streak < self._cfg.empty_after:
                if self._empty_streak == 1:
                    log.warning(
                        "discovery %s: no address in the answer; keeping %d backend(s)"
                        " unless the next %d lookup(s) agree",
                        self._label,
                        len(self._current),
                        self._cfg.empty_after - 1,
                    )
                return False
        else:
            self._empty_streak = 0
        if tuple(answer) == self._current:
            return False
        return self._apply(tuple(answer))

    async def run(self) -> None:
        """Refresh every ``refresh_s`` (± jitter) until cancelled. The first
        wait comes first: call :meth:`resolve_once` before, at start-up."""
        while True:
            await self._sleep(self.next_delay())
            await self.refresh()

    def next_delay(self) -> float:
        """Seconds until the next lookup: ``refresh_s`` ± up to ``jitter`` of it."""
        spread = self._jitter * self._rng.uniform(-1.0, 1.0)
        return self._cfg.refresh_s * (1.0 + spread)

    async def _lookup(self) -> list[IpAddress] | None:
        """The addresses of the family asked for; ``None`` when the lookup failed."""
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                raw = await self._resolver.resolve(self._cfg.dns)
        except Exception as exc:
            # Isolation boundary: the resolver is pluggable, and whatever it
            # raises leaves the answer unknown, which keeps the last good set.
            self._record_failure(exc)
            return None
        if self._failure_streak:
            log.info(
                "discovery %s: lookups work again after %d failure(s)",
                self._label,
                self._failure_streak,
            )
        self._failure_streak = 0
        self._last_error = None
        self._last_success_at = self._clock()
        return [ip for ip in _normalise(raw) if self._family_wanted(ip)]

    def _family_wanted(self, ip: IpAddress) -> bool:
        family = self._ip_family
        return family == "any" or (family == "ipv4") == (ip.version == 4)

    def _record_failure(self, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            detail = f"lookup timed out after {self._cfg.timeout_s:g}s"
        else:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._last_error = detail
        self._last_error_at = self._clock()
        self._failures_total += 1
        self._failure_streak += 1
        if self._failure_streak == 1:
            log.warning(
                "discovery %s: lookup failed (%s); keeping the last good set of %d backend(s)",
                self._label,
                detail,
                len(self._current),
            )

    def _apply(self, addresses: tuple[IpAddress, ...]) -> bool:
        before, after = set(self._current), set(addresses)
        backends = [backend_for(ip, self._cfg) for ip in addresses]
        try:
            self._on_change(backends)
        except Exception:
            # The caller's failure: keep the old set so the change is offered again.
            log.exception("discovery %s: applying the new backend list failed", self._label)
            return False
        self._current = addresses
        self._empty_streak = 0
        log.log(
            logging.INFO if addresses else logging.WARNING,
            "discovery %s: %d backend(s); joined %s; left %s",
            self._label,
            len(addresses),
            _names(after - before) or "none",
            _names(before - after) or "none",
        )
        return True


def _names(ips: set[IpAddress]) -> str:
    return ", ".join(str(ip) for ip in sorted(ips, key=lambda ip: (ip.version, int(ip))))
