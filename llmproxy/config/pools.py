"""Pools and their backends, with the top-level ``defaults:`` applied first.

``defaults:`` takes any pool key except ``backends`` and ``discovery``; a
pool's own sections are merged over it key by key, so a pool can change one
timeout and keep the rest of the fleet-wide ones. A pool lists its
``backends`` or finds them in DNS (``discovery``), not both: discovery
replaces the whole list.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from llmproxy.config.env import EnvScalar, Unresolved
from llmproxy.config.errors import Issues, index_path, key_path
from llmproxy.config.fields import (
    BOUNDS,
    INVALID,
    Bound,
    Invalid,
    apply_fields,
    build_section,
    check_keys,
    describe,
    is_null,
    read_list,
    read_mapping,
    read_str,
    read_weight,
    require,
)
from llmproxy.config.schema import (
    BALANCERS,
    AutoscaleConfig,
    BackendConfig,
    BreakerConfig,
    DiscoveryConfig,
    HealthConfig,
    OutlierConfig,
    PoolConfig,
    RetryConfig,
    TimeoutsConfig,
)
from llmproxy.config.values import (
    HASH_KEY_MODES,
    URL_SCHEMES,
    BackendAddress,
    Problem,
    dns_name_problem,
    name_problem,
    parse_backend_url,
    parse_key_mode,
)

_S = TypeVar(
    "_S", HealthConfig, BreakerConfig, RetryConfig, TimeoutsConfig, OutlierConfig, AutoscaleConfig
)

#: Pool-level scalars, read with the schema's types and bounds.
_SCALAR_KEYS = ("slow_start_s", "panic_mode", "api_key")
_SETTINGS_KEYS = (
    "balancer",
    "hash_key",
    "health",
    "breaker",
    "retry",
    "timeouts",
    "outlier",
    "autoscale",
    *_SCALAR_KEYS,
)
_POOL_KEYS = ("backends", "discovery", *_SETTINGS_KEYS)
_BACKEND_KEYS = ("url", "weight", "name")
#: A discovered address needs a real port; 0 ("any free port") means nothing here.
_DISCOVERY_BOUNDS = types.MappingProxyType({**BOUNDS, "port": Bound(1, 65535)})


def build_defaults(value: object, issues: Issues) -> PoolConfig:
    """The template every pool starts from: schema defaults, then ``defaults:``."""
    template = PoolConfig(name="", backends=())
    if is_null(value):
        return template
    data = read_mapping(value, "defaults", issues)
    if data is None:
        return template
    check_keys(data, _SETTINGS_KEYS, "defaults", issues)
    return _apply_settings(data, "defaults", template, issues)


def build_pools(value: object, template: PoolConfig, issues: Issues) -> dict[str, PoolConfig]:
    if isinstance(value, Invalid):
        return {}
    data = read_mapping(value, "pools", issues)
    if data is None:
        return {}
    if not data:
        issues.add("pools", "must define at least one pool")
    pools: dict[str, PoolConfig] = {}
    for name, body in data.items():
        path = key_path("pools", name)
        problem = name_problem(name)
        if problem is not None:
            issues.add(path, f"pool name {problem}")
        pools[name] = _build_pool(name, body, path, template, issues)
    return pools


def _build_pool(
    name: str, value: object, path: str, template: PoolConfig, issues: Issues
) -> PoolConfig:
    data = read_mapping(value, path, issues)
    if data is None:
        return replace(template, name=name)
    check_keys(data, _POOL_KEYS, path, issues)
    pool = _apply_settings(data, path, template, issues)
    backends_path = key_path(path, "backends")
    discovery: DiscoveryConfig | None = None
    backends: tuple[BackendConfig, ...] = ()
    if not is_null(data.get("discovery")):
        discovery = _build_discovery(data["discovery"], key_path(path, "discovery"), issues)
        listed = data.get("backends")
        items = None if is_null(listed) else read_list(listed, backends_path, issues)
        if items:
            issues.add(
                path,
                "give either 'backends' or 'discovery', not both"
                " (discovery replaces the backend list)",
            )
    elif "backends" not in data:
        issues.add(path, "needs 'backends' (a list of URLs) or 'discovery' (a DNS name)")
    else:
        backends = _build_backends(data["backends"], backends_path, issues)
    _check_consistency(pool, path, issues)
    return replace(pool, name=name, backends=backends, discovery=discovery)


def _apply_settings(
    data: Mapping[str, object], path: str, base: PoolConfig, issues: Issues
) -> PoolConfig:
    balancer = base.balancer
    if "balancer" in data:
        balancer_path = key_path(path, "balancer")
        text = read_str(data["balancer"], balancer_path, issues)
        if isinstance(text, str) and text not in BALANCERS:
            known = ", ".join(BALANCERS)
            issues.add(balancer_path, f"unknown balancer {text!r} (known: {known})")
        elif isinstance(text, str):
            balancer = text
    hash_key = base.hash_key
    if "hash_key" in data:
        hash_key_path = key_path(path, "hash_key")
        text = read_str(data["hash_key"], hash_key_path, issues)
        if isinstance(text, str):
            mode = parse_key_mode(text, HASH_KEY_MODES, "hash_key mode")
            if isinstance(mode, Problem):
                issues.add(hash_key_path, mode.message)
            else:
                hash_key = mode

    def section(key: str, cls: type[_S], current: _S) -> _S:
        return build_section(cls, data.get(key), key_path(path, key), issues, current)

    health = section("health", HealthConfig, base.health)
    health_data = data.get("health")
    path_given = isinstance(health_data, dict) and "path" in health_data
    if path_given and not health.path.startswith("/"):
        health_path = key_path(key_path(path, "health"), "path")
        issues.add(health_path, f"must start with '/', got {health.path!r}")
    if "deep_path" in (health_data if isinstance(health_data, dict) else {}) and not (
        health.deep_path.startswith("/")
    ):
        deep_path = key_path(key_path(path, "health"), "deep_path")
        issues.add(deep_path, f"must start with '/', got {health.deep_path!r}")
    scalars = {k: data[k] for k in _SCALAR_KEYS if k in data}
    base = apply_fields(PoolConfig, scalars, path, issues, base) if scalars else base
    if "api_key" in data and base.api_key is not None:
        # ``${VLLM_API_KEY:-}`` left empty means no key of the pool's own.
        api_key = base.api_key.strip() or None
        if api_key is not None and any(ch.isspace() for ch in api_key):
            issues.add(key_path(path, "api_key"), "must not contain whitespace")
        base = replace(base, api_key=api_key)
    return replace(
        base,
        balancer=balancer,
        hash_key=hash_key,
        health=health,
        breaker=section("breaker", BreakerConfig, base.breaker),
        retry=section("retry", RetryConfig, base.retry),
        timeouts=section("timeouts", TimeoutsConfig, base.timeouts),
        outlier=section("outlier", OutlierConfig, base.outlier),
        autoscale=_autoscale(section("autoscale", AutoscaleConfig, base.autoscale), path, issues),
    )


def _autoscale(cfg: AutoscaleConfig, path: str, issues: Issues) -> AutoscaleConfig:
    where = key_path(path, "autoscale")
    if cfg.stale_after_s < cfg.scrape_interval_s:
        issues.add(
            key_path(where, "stale_after_s"),
            f"must be at least scrape_interval_s ({cfg.scrape_interval_s}),"
            f" got {cfg.stale_after_s}",
        )
    if not cfg.metrics_path.startswith("/"):
        issues.add(
            key_path(where, "metrics_path"), f"must start with '/', got {cfg.metrics_path!r}"
        )
    return cfg


def _check_consistency(pool: PoolConfig, path: str, issues: Issues) -> None:
    """Cross-field checks, on the pool as merged with ``defaults:``."""
    retry, timeouts = pool.retry, pool.timeouts
    if retry.backoff_max_s < retry.backoff_base_s:
        issues.add(
            key_path(key_path(path, "retry"), "backoff_max_s"),
            f"must be at least backoff_base_s ({retry.backoff_base_s}), got {retry.backoff_max_s}",
        )
    for shorter in ("connect_s", "first_byte_s"):
        limit = getattr(timeouts, shorter)
        if timeouts.total_s < limit:
            issues.add(
                key_path(key_path(path, "timeouts"), "total_s"),
                f"must be at least {shorter} ({limit}), got {timeouts.total_s}",
            )


def _build_discovery(value: object, path: str, issues: Issues) -> DiscoveryConfig | None:
    """``{dns, port, scheme?, refresh_s?, empty_after?, timeout_s?}``; ``None`` if unusable."""
    data = read_mapping(value, path, issues)
    if data is None:
        return None
    dns_path = key_path(path, "dns")
    dns = read_str(require(data, "dns", path, issues), dns_path, issues)
    if isinstance(dns, str):
        dns = dns.strip()
        problem = dns_name_problem(dns)
        if problem is not None:
            issues.add(dns_path, problem)
            dns = INVALID
    if "port" not in data:
        issues.add(key_path(path, "port"), "is required")
    rest = {k: v for k, v in data.items() if k != "dns"}
    base = DiscoveryConfig(dns="", port=0)
    discovery = apply_fields(DiscoveryConfig, rest, path, issues, base, bounds=_DISCOVERY_BOUNDS)
    scheme_ok = discovery.scheme in URL_SCHEMES
    if not scheme_ok:
        message = f"unknown scheme {discovery.scheme!r} (known: {', '.join(URL_SCHEMES)})"
        issues.add(key_path(path, "scheme"), message)
    if isinstance(dns, Invalid) or discovery.port == 0 or not scheme_ok:
        return None
    return replace(discovery, dns=dns)


def _build_backends(value: object, path: str, issues: Issues) -> tuple[BackendConfig, ...]:
    items = read_list(value, path, issues)
    if items is None:
        return ()
    if not items:
        issues.add(path, "must list at least one backend (or set the pool's 'discovery')")
    backends: list[BackendConfig] = []
    urls: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        item_path = index_path(path, i)
        entry = _read_backend(item, item_path, issues)
        if entry is None or entry.address is None:
            continue
        url = entry.address.url
        if url in urls:
            first = index_path("backends", urls[url])
            issues.add(entry.url_path, f"duplicate backend {url} (same as {first})")
            continue
        urls[url] = i
        if isinstance(entry.name, Invalid) or isinstance(entry.weight, Invalid):
            continue
        name = entry.name or entry.address.host_port
        if name in names:
            first = index_path("backends", names[name])
            if entry.name is None:
                issues.add(item_path, f"backend name {name!r} is also used by {first}; set a name")
            else:
                message = f"duplicate backend name {name!r} (also {first})"
                issues.add(key_path(item_path, "name"), message)
            continue
        names[name] = i
        backends.append(BackendConfig(url=url, weight=entry.weight, name=name))
    return tuple(backends)


@dataclass(frozen=True, slots=True)
class _BackendEntry:
    """One backend as read, before the checks across the list."""

    url_path: str
    #: ``None`` when the URL was missing or unusable (and reported).
    address: BackendAddress | None
    #: ``None`` when not given: the name defaults to ``host:port``.
    name: str | Invalid | None
    weight: float | Invalid


def _read_backend(item: object, path: str, issues: Issues) -> _BackendEntry | None:
    """One backend: a URL string, or ``{url, weight?, name?}``."""
    if isinstance(item, str | EnvScalar | Unresolved):
        return _BackendEntry(path, _read_url(item, path, issues), None, 1.0)
    if not isinstance(item, dict):
        issues.add(path, f"expected a URL or a mapping {{url, weight, name}}, got {describe(item)}")
        return None
    data = read_mapping(item, path, issues) or {}
    check_keys(data, _BACKEND_KEYS, path, issues)
    url_path = key_path(path, "url")
    address = _read_url(require(data, "url", path, issues), url_path, issues)
    weight = (
        read_weight(data["weight"], key_path(path, "weight"), issues) if "weight" in data else 1.0
    )
    name = (
        _read_backend_name(data["name"], key_path(path, "name"), issues) if "name" in data else None
    )
    return _BackendEntry(url_path, address, name, weight)


def _read_url(value: object, path: str, issues: Issues) -> BackendAddress | None:
    text = read_str(value, path, issues)
    if isinstance(text, Invalid):
        return None
    address = parse_backend_url(text)
    if isinstance(address, Problem):
        issues.add(path, address.message)
        return None
    return address


def _read_backend_name(value: object, path: str, issues: Issues) -> str | Invalid:
    name = read_str(value, path, issues)
    if isinstance(name, str):
        problem = name_problem(name)
        if problem is not None:
            issues.add(path, f"backend name {problem}")
            return INVALID
    return name
