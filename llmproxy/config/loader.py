"""Load, interpolate and validate a configuration: the only way a Config is made from YAML.

Everything wrong with a file is reported at once, each message starting with
the YAML path it is about (``pools.main.backends[1].url: ...``), so that a
single ``llmproxy check-config`` run is enough to fix a file.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace

from llmproxy.config.env import EnvScalar, interpolate
from llmproxy.config.errors import ConfigError, Issues, index_path, key_path
from llmproxy.config.features import build_access_log, build_auth, build_cluster, build_tracing
from llmproxy.config.fields import (
    apply_fields,
    build_section,
    check_keys,
    is_null,
    read_list,
    read_mapping,
    read_str,
    require,
)
from llmproxy.config.pools import build_defaults, build_pools
from llmproxy.config.routes import build_routes
from llmproxy.config.schema import (
    AdminConfig,
    Config,
    RateLimitRule,
    RateLimitsConfig,
    ServerConfig,
)
from llmproxy.config.values import RATE_LIMIT_KEYS, Problem, name_problem, parse_key_mode
from llmproxy.config.yaml_source import read_yaml_file

_TOP_KEYS = (
    "server",
    "admin",
    "defaults",
    "pools",
    "routes",
    "rate_limits",
    "auth",
    "access_log",
    "tracing",
    "cluster",
)
#: ``rate_limits`` keys read with the schema's types and bounds.
_RATE_LIMIT_SCALARS = ("redis_timeout_s", "key_prefix")
_RATE_LIMIT_KEYS = ("store", "on_store_error", "rules", *_RATE_LIMIT_SCALARS)
_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
_ON_STORE_ERROR = ("allow", "deny")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read ``path``; ``${VAR}`` comes from ``env`` (the process environment by default).

    Raises :class:`ConfigError` listing every problem, including an unreadable
    file or a YAML syntax error.
    """
    source = os.fspath(path)
    data = read_yaml_file(source)
    return parse_config(data, os.environ if env is None else env, source=source)


def parse_config(data: object, env: Mapping[str, str], source: str | None = None) -> Config:
    """Build a Config from already-parsed YAML data (as ``yaml.safe_load`` returns it)."""
    issues = Issues()
    config = _build(interpolate(data, env, "", issues), issues, source)
    if issues or config is None:
        raise ConfigError(issues.messages, source)
    return config


def check_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem with the file at ``path``; empty when it would load."""
    try:
        load_config(path, env)
    except ConfigError as exc:
        return exc.errors
    return []


def _build(data: object, issues: Issues, source: str | None) -> Config | None:
    if is_null(data):
        issues.add("", "the configuration is empty")
        return None
    top = read_mapping(data, "", issues)
    if top is None:
        return None
    check_keys(top, _TOP_KEYS, "", issues)
    server = _build_server(top.get("server"), issues)
    admin = _build_admin(top.get("admin"), server, issues)
    template = build_defaults(top.get("defaults"), issues)
    pools = build_pools(require(top, "pools", "", issues), template, issues)
    routes = build_routes(require(top, "routes", "", issues), pools.keys(), issues)
    rate_limits = _build_rate_limits(top.get("rate_limits"), issues)
    return Config(
        pools=pools,
        routes=routes,
        server=server,
        admin=admin,
        rate_limits=rate_limits,
        auth=build_auth(top.get("auth"), issues),
        access_log=build_access_log(top.get("access_log"), issues),
        tracing=build_tracing(top.get("tracing"), issues),
        cluster=build_cluster(top.get("cluster"), issues),
        source=source,
    )


#: The main listener's HTTP/1.1 servers (``server.http``).
HTTP_SERVERS = ("httptools", "aiohttp")


def _build_server(value: object, issues: Issues) -> ServerConfig:
    server = build_section(ServerConfig, value, "server", issues, ServerConfig())
    if not server.host.strip():
        issues.add("server.host", "must not be empty")
    if server.http not in HTTP_SERVERS:
        known = ", ".join(HTTP_SERVERS)
        issues.add("server.http", f"unknown HTTP server {server.http!r} (known: {known})")
    return server


def _build_admin(value: object, server: ServerConfig, issues: Issues) -> AdminConfig:
    admin = build_section(AdminConfig, value, "admin", issues, AdminConfig())
    token = admin.token.strip() if admin.token is not None else None
    admin = replace(admin, token=token or None)
    if not admin.host.strip():
        issues.add("admin.host", "must not be empty")
    elif (
        admin.enabled
        and admin.token is None
        and not _token_reported(value)
        and not _is_loopback(admin.host)
    ):
        # Without a token the admin API (drain, weights, reload) is open to
        # anyone who can reach it; that is only acceptable on loopback.
        issues.add(
            "admin.token",
            f"is required when admin.host ({admin.host}) is not a loopback address",
        )
    same_socket = admin.port == server.port and admin.port != 0
    if admin.enabled and same_socket and _hosts_overlap(admin.host, server.host):
        issues.add("admin.port", f"is the same as server.port ({server.port})")
    return admin


def _token_reported(admin: object) -> bool:
    """Whether ``admin.token`` was given but already reported as bad (no second message)."""
    if not isinstance(admin, dict) or "token" not in admin:
        return False
    return not isinstance(admin["token"], str | EnvScalar) and admin["token"] is not None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hosts_overlap(first: str, second: str) -> bool:
    return first == second or first in _WILDCARD_HOSTS or second in _WILDCARD_HOSTS


def _build_rate_limits(value: object, issues: Issues) -> RateLimitsConfig:
    path = "rate_limits"
    if is_null(value):
        return RateLimitsConfig()
    data = read_mapping(value, path, issues)
    if data is None:
        return RateLimitsConfig()
    check_keys(data, _RATE_LIMIT_KEYS, path, issues)
    config = RateLimitsConfig()
    if "store" in data:
        store_path = key_path(path, "store")
        store = read_str(data["store"], store_path, issues)
        problem = _store_problem(store) if isinstance(store, str) else None
        if problem is not None:
            issues.add(store_path, problem)
        elif isinstance(store, str):
            config = RateLimitsConfig(store=store.strip())
    on_error = config.on_store_error
    if "on_store_error" in data:
        on_error_path = key_path(path, "on_store_error")
        text = read_str(data["on_store_error"], on_error_path, issues)
        if isinstance(text, str) and text not in _ON_STORE_ERROR:
            known = ", ".join(_ON_STORE_ERROR)
            issues.add(on_error_path, f"unknown on_store_error {text!r} (known: {known})")
        elif isinstance(text, str):
            on_error = text
    rules = _build_rules(data.get("rules"), key_path(path, "rules"), issues)
    scalars = {k: data[k] for k in _RATE_LIMIT_SCALARS if k in data}
    config = apply_fields(RateLimitsConfig, scalars, path, issues, config)
    if "key_prefix" in data and not config.key_prefix.strip():
        issues.add(key_path(path, "key_prefix"), "must not be empty")
    return replace(config, on_store_error=on_error, rules=rules)


def _store_problem(store: str) -> str | None:
    store = store.strip()
    if store == "memory":
        return None
    if not store.startswith(("redis://", "rediss://")):
        return f"must be 'memory' or a redis:// or rediss:// URL, got {store!r}"
    try:
        host = urllib.parse.urlsplit(store).hostname
    except ValueError as exc:
        return f"malformed Redis URL {store!r}: {exc}"
    return None if host else f"Redis URL {store!r} has no host"


def _build_rules(value: object, path: str, issues: Issues) -> tuple[RateLimitRule, ...]:
    if is_null(value):
        return ()
    items = read_list(value, path, issues)
    if items is None:
        return ()
    rules: list[RateLimitRule] = []
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        item_path = index_path(path, i)
        data = read_mapping(item, item_path, issues)
        if data is None:
            continue
        key_value = require(data, "key", item_path, issues)
        key = read_str(key_value, key_path(item_path, "key"), issues)
        limits = {name: limit for name, limit in data.items() if name != "key"}
        rule = apply_fields(RateLimitRule, limits, item_path, issues, RateLimitRule(key=""))
        if isinstance(key, str):
            mode = parse_key_mode(key.strip(), RATE_LIMIT_KEYS, "rate limit key")
            if isinstance(mode, Problem):
                issues.add(key_path(item_path, "key"), mode.message)
            else:
                rule = replace(rule, key=mode)
        if not any(name in data and not is_null(data[name]) for name in _LIMITS):
            issues.add(item_path, f"set at least one of {', '.join(_LIMITS)}")
        if rule.name is not None:
            _check_rule_name(rule.name, key_path(item_path, "name"), names, i, issues)
        rules.append(rule)
    return tuple(rules)


def _check_rule_name(
    name: str, path: str, names: dict[str, int], index: int, issues: Issues
) -> None:
    problem = name_problem(name)
    if problem is not None:
        issues.add(path, f"rule name {problem}")
    elif name in names:
        issues.add(path, f"duplicate rule name {name!r} (also rules[{names[name]}])")
    else:
        names[name] = index
