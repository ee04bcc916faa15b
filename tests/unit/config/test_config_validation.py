"""Every validation rule, each asserted with its exact message and YAML path.

Each case changes one value of a valid configuration and expects exactly one
message back, so a rule that stops firing, fires twice or cascades fails here.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import pytest

from llmproxy.config import ConfigError, parse_config, schema
from llmproxy.config.fields import BOUNDS

DELETE = object()
KNOWN_BALANCERS = (
    "round_robin, weighted_round_robin, least_connections, power_of_two, random, consistent_hash"
)
SHA_A = "a" * 64
SHA_B = "b" * 64
DISCOVERY = {"dns": "vllm-headless.llm.svc.cluster.local", "port": 8000}


def base() -> dict[str, Any]:
    return {
        "pools": {
            "stable": {"backends": ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]},
            "canary": {"backends": [{"url": "http://127.0.0.1:9003", "weight": 2, "name": "c0"}]},
        },
        "routes": [
            {
                "name": "chat",
                "match": {"model": "llama-*"},
                "split": [{"pool": "stable", "weight": 90}, {"pool": "canary", "weight": 10}],
                "sticky": "header:x-user-id",
            },
            {"name": "rest", "pool": "stable"},
        ],
    }


def key(name: str = "alice", sha256: str = SHA_A, **more: object) -> dict[str, object]:
    """One ``auth.keys`` entry."""
    return {"name": name, "sha256": sha256, **more}


def discovered(**changes: object) -> dict[str, object]:
    """A pool whose backends come from DNS."""
    return {"discovery": {**DISCOVERY, **changes}}


def canary(**changes: object) -> dict[str, object]:
    """A ``canary`` section for ``routes[0]`` (split: stable, canary)."""
    return {"canary_pool": "canary", "stable_pool": "stable", **changes}


def put(data: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A copy of ``data`` with the value at a YAML ``path`` replaced (or removed: DELETE)."""
    keys: list[str | int] = [
        int(index) if index else (name or quoted)
        for name, index, quoted in re.findall(r'([\w-]+)|\[(\d+)\]|\["([^"]*)"\]', path)
    ]
    data = copy.deepcopy(data)
    node: Any = data
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


def errors_of(data: object, env: dict[str, str] | None = None) -> list[str]:
    try:
        parse_config(data, env or {})
    except ConfigError as exc:
        return exc.errors
    return []


@dataclass(frozen=True)
class At:
    """An expected message about another path than the one changed."""

    path: str
    message: str


#: (path changed, new value, message expected at that path, or At(path, message)).
CASES: list[tuple[str, object, str | At]] = [
    # top level
    ("poolz", {}, "unknown key (did you mean 'pools'?)"),
    # pools and backends
    ("pools", DELETE, "is required"),
    ("pools", {}, "must define at least one pool"),
    ("pools", ["a"], "expected a mapping, got a list"),
    # routes
    ("routes", DELETE, "is required"),
    ("routes", [], "must define at least one route"),
    ("routes", {"a": 1}, "expected a list, got a mapping"),
    # server and admin
    ("server.prot", 1, "unknown key (did you mean 'port'?)"),
    (
        "server.zzz",
        1,
        "unknown key (known: host, port, max_body_bytes, drain_timeout_s, workers,"
        " trust_forwarded_for, http, keepalive_timeout_s)",
    ),
    ("server.http", "h11", "unknown HTTP server 'h11' (known: httptools, aiohttp)"),
    ("server.keepalive_timeout_s", 0, "must be greater than 0, got 0"),
    ("server.trust_forwarded_for", "yes", "expected true or false, got string 'yes'"),
    ("server.port", 70000, "must be between 0 and 65535, got 70000"),
    ("admin.port", -1, "must be between 0 and 65535, got -1"),
    ("server.port", True, "expected an integer, got boolean true"),
    ("server.port", 80.5, "expected an integer, got number 80.5"),
    ("server.port", "80", "expected an integer, got string '80'"),
    ("server.host", "", "must not be empty"),
    ("server.host", 1, "expected a string, got integer 1 (quote it to make it text)"),
    ("server.workers", 0, "must be at least 1, got 0"),
    ("server", 5, "expected a mapping, got integer 5"),
    ("admin.enabled", "yes", "expected true or false, got string 'yes'"),
    ("admin.port", 8080, "is the same as server.port (8080)"),
    (
        "admin.host",
        "0.0.0.0",
        At("admin.token", "is required when admin.host (0.0.0.0) is not a loopback address"),
    ),
    # pools and backends
    ("pools.stable.backend", [], "unknown key (did you mean 'backends'?)"),
    (
        "pools.stable.backends",
        DELETE,
        At("pools.stable", "needs 'backends' (a list of URLs) or 'discovery' (a DNS name)"),
    ),
    (
        "pools.stable.backends",
        [],
        "must list at least one backend (or set the pool's 'discovery')",
    ),
    ("pools.stable", "x", "expected a mapping, got string 'x'"),
    (
        "pools.stable.balancer",
        "least_conn",
        f"unknown balancer 'least_conn' (known: {KNOWN_BALANCERS})",
    ),
    (
        "pools.stable.hash_key",
        "cookie",
        "unknown hash_key mode 'cookie' (known: header:NAME, api_key, ip, model)",
    ),
    ("pools.stable.hash_key", "header:", "hash_key mode 'header:': invalid header name ''"),
    ("pools.stable.health.path", "health", "must start with '/', got 'health'"),
    ("pools.stable.health.interval_s", 0, "must be greater than 0, got 0"),
    ("pools.stable.health.healthy_threshold", 0, "must be at least 1, got 0"),
    ("pools.stable.health.unhealthy_threshold", 0, "must be at least 1, got 0"),
    ("pools.stable.health.intreval_s", 1, "unknown key (did you mean 'interval_s'?)"),
    ("pools.stable.breaker.failure_threshold", 0, "must be at least 1, got 0"),
    ("pools.stable.breaker.reset_timeout_s", -2.5, "must be greater than 0, got -2.5"),
    ("pools.stable.retry.attempts", 0, "must be at least 1, got 0"),
    ("pools.stable.retry.budget_ratio", 1.5, "must be between 0 and 1, got 1.5"),
    ("pools.stable.retry.budget_ratio", -0.1, "must be between 0 and 1, got -0.1"),
    ("pools.stable.retry.retry_on_429", 1, "expected true or false, got integer 1"),
    (
        "pools.stable.retry",
        {"backoff_base_s": 1, "backoff_max_s": 0.5},
        At("pools.stable.retry.backoff_max_s", "must be at least backoff_base_s (1.0), got 0.5"),
    ),
    ("pools.stable.timeouts.first_byte_s", 0, "must be greater than 0, got 0"),
    ("pools.stable.timeouts.idle_s", float("inf"), "must be a finite number, got inf"),
    ("pools.stable.timeouts.connect_s", "2s", "expected a number, got string '2s'"),
    ("pools.stable.timeouts.total_s", 30, "must be at least first_byte_s (60.0), got 30.0"),
    (
        'pools["my pool"]',
        {"backends": ["http://a:1"]},
        "pool name 'my pool' must not contain whitespace or '/'",
    ),
    ("pools.canary.backends[0].weight", 0, "must be greater than 0, got 0"),
    ("pools.canary.backends[0].weight", -1, "must be greater than 0, got -1"),
    ("pools.canary.backends[0].weight", True, "expected a number, got boolean true"),
    ("pools.canary.backends[0].url", DELETE, "is required"),
    ("pools.canary.backends[0].wieght", 1, "unknown key (did you mean 'weight'?)"),
    (
        "pools.stable.backends[1]",
        42,
        "expected a URL or a mapping {url, weight, name}, got integer 42",
    ),
    (
        "pools.stable.backends[1]",
        "ftp://h:1",
        "must be an http:// or https:// URL, got 'ftp://h:1'",
    ),
    (
        "pools.stable.backends[1]",
        "127.0.0.1:9009",
        "must be an http:// or https:// URL, got '127.0.0.1:9009'",
    ),
    ("pools.canary.backends[0].url", "http://:8000", "URL 'http://:8000' has no host"),
    (
        "pools.stable.backends[1]",
        "http://h:1?a=b",
        "URL 'http://h:1?a=b' must not have a query string or fragment",
    ),
    (
        "pools.stable.backends[1]",
        "http://h:1#x",
        "URL 'http://h:1#x' must not have a query string or fragment",
    ),
    (
        "pools.stable.backends[1]",
        "http://h:1/v1",
        "URL 'http://h:1/v1' must not have a path ('/v1');"
        " the client's request path is forwarded unchanged",
    ),
    (
        "pools.stable.backends[1]",
        "http://h:99999",
        "malformed URL 'http://h:99999': Port out of range 0-65535",
    ),
    (
        "pools.stable.backends[1]",
        "http://h:0",
        "URL 'http://h:0' has port 0; a backend needs a real port",
    ),
    (
        "pools.stable.backends[1]",
        "http://u:p@h:1",
        "URL 'http://u:p@h:1' must not contain credentials",
    ),
    ("pools.stable.backends[1]", "http://a b:1", "URL 'http://a b:1' has an invalid host 'a b'"),
    (
        "pools.stable.backends[1]",
        "HTTP://127.0.0.1:9001/",
        "duplicate backend http://127.0.0.1:9001 (same as backends[0])",
    ),
    (
        "pools.stable.backends",
        ["http://h", "http://h:80"],
        At("pools.stable.backends[1]", "duplicate backend http://h:80 (same as backends[0])"),
    ),
    (
        "pools.stable.backends",
        [{"url": "http://a:1", "name": "x"}, {"url": "http://b:1", "name": "x"}],
        At("pools.stable.backends[1].name", "duplicate backend name 'x' (also backends[0])"),
    ),
    (
        "pools.stable.backends",
        ["http://a:1", "https://a:1"],
        At(
            "pools.stable.backends[1]", "backend name 'a:1' is also used by backends[0]; set a name"
        ),
    ),
    (
        "pools.canary.backends[0].name",
        "a/b",
        "backend name 'a/b' must not contain whitespace or '/'",
    ),
    # pool api_key
    (
        "pools.stable.api_key",
        12345,
        "expected a string, got integer 12345 (quote it to make it text)",
    ),
    ("pools.stable.api_key", "sk one", "must not contain whitespace"),
    ("defaults.api_key", ["k"], "expected a string, got a list"),
    # pool discovery
    (
        "pools.stable.discovery",
        DISCOVERY,
        At(
            "pools.stable",
            "give either 'backends' or 'discovery', not both (discovery replaces the backend list)",
        ),
    ),
    (
        "pools.stable",
        {"discovery": "vllm"},
        At("pools.stable.discovery", "expected a mapping, got string 'vllm'"),
    ),
    (
        "pools.stable",
        {"discovery": {"port": 8000}},
        At("pools.stable.discovery.dns", "is required"),
    ),
    ("pools.stable", {"discovery": {"dns": "v"}}, At("pools.stable.discovery.port", "is required")),
    (
        "pools.stable",
        discovered(dns="http://vllm:8000"),
        At(
            "pools.stable.discovery.dns",
            "must be a DNS name (no scheme, port or path), got 'http://vllm:8000'",
        ),
    ),
    (
        "pools.stable",
        discovered(dns="-bad.example"),
        At(
            "pools.stable.discovery.dns",
            "must be a DNS name (no scheme, port or path), got '-bad.example'",
        ),
    ),
    (
        "pools.stable",
        discovered(dns=""),
        At("pools.stable.discovery.dns", "must not be empty"),
    ),
    (
        "pools.stable",
        discovered(port=0),
        At("pools.stable.discovery.port", "must be between 1 and 65535, got 0"),
    ),
    (
        "pools.stable",
        discovered(port=70000),
        At("pools.stable.discovery.port", "must be between 1 and 65535, got 70000"),
    ),
    (
        "pools.stable",
        discovered(port="8000"),
        At("pools.stable.discovery.port", "expected an integer, got string '8000'"),
    ),
    (
        "pools.stable",
        discovered(scheme="grpc"),
        At("pools.stable.discovery.scheme", "unknown scheme 'grpc' (known: http, https)"),
    ),
    (
        "pools.stable",
        discovered(refresh_s=0),
        At("pools.stable.discovery.refresh_s", "must be greater than 0, got 0"),
    ),
    (
        "pools.stable",
        discovered(empty_after=0),
        At("pools.stable.discovery.empty_after", "must be at least 1, got 0"),
    ),
    (
        "pools.stable",
        discovered(timeout_s=-1),
        At("pools.stable.discovery.timeout_s", "must be greater than 0, got -1"),
    ),
    (
        "pools.stable",
        discovered(refresh=5),
        At("pools.stable.discovery.refresh", "unknown key (did you mean 'refresh_s'?)"),
    ),
    # routes
    ("routes[1].stiky", "ip", "unknown key (did you mean 'sticky'?)"),
    ("routes[1]", "x", "expected a mapping, got string 'x'"),
    ("routes[1].name", DELETE, "is required"),
    ("routes[1].name", 3, "expected a string, got integer 3 (quote it to make it text)"),
    ("routes[1].name", "chat", "duplicate route name 'chat' (also routes[0])"),
    ("routes[0].split[1].pool", "canry", "unknown pool 'canry' (known: canary, stable)"),
    ("routes[1].pool", "stabel", "unknown pool 'stabel' (known: canary, stable)"),
    ("routes[0].split[1].weight", 0, "must be greater than 0, got 0"),
    ("routes[0].split[1].weight", DELETE, "is required"),
    ("routes[0].split[1].pool", DELETE, "is required"),
    ("routes[0].split", [], "must list at least one {pool, weight}"),
    ("routes[0].split", "stable", "expected a list, got string 'stable'"),
    ("routes[0].split[0].wt", 1, "unknown key (known: pool, weight)"),
    ("routes[0].split[1].pool", "stable", "pool 'stable' is already in the split (at split[0])"),
    ("routes[0].pool", "stable", At("routes[0]", "give either 'split' or 'pool', not both")),
    (
        "routes[1].pool",
        DELETE,
        At("routes[1]", "needs 'split' (a list of {pool, weight}) or 'pool' (one pool name)"),
    ),
    (
        "routes[0].sticky",
        "cookie",
        "unknown sticky mode 'cookie' (known: none, ip, api_key, header:NAME)",
    ),
    (
        "routes[0].sticky",
        "header:x user",
        "sticky mode 'header:x user': invalid header name 'x user'",
    ),
    (
        "routes[1].fallback",
        ["canary", "nope"],
        At("routes[1].fallback[1]", "unknown pool 'nope' (known: canary, stable)"),
    ),
    (
        "routes[1].fallback",
        ["canary", "canary"],
        At("routes[1].fallback[1]", "pool 'canary' is listed twice"),
    ),
    ("routes[1].fallback", "canary", "expected a list, got string 'canary'"),
    # route canary
    ("routes[0].canary", "canary", "expected a mapping, got string 'canary'"),
    (
        "routes[0].canary",
        {"canary_pool": "canary"},
        At("routes[0].canary.stable_pool", "is required"),
    ),
    (
        "routes[0].canary",
        {"stable_pool": "stable"},
        At("routes[0].canary.canary_pool", "is required"),
    ),
    (
        "routes[0].canary",
        canary(canary_pool="nope"),
        At("routes[0].canary.canary_pool", "pool 'nope' is not in the route's split"),
    ),
    (
        "routes[1].canary",
        canary(),
        At("routes[1].canary.canary_pool", "pool 'canary' is not in the route's split"),
    ),
    (
        "routes[0].canary",
        canary(stable_pool="canary"),
        At("routes[0].canary.stable_pool", "must differ from canary_pool"),
    ),
    (
        "routes[0].canary",
        canary(stable_pool=5),
        At(
            "routes[0].canary.stable_pool",
            "expected a string, got integer 5 (quote it to make it text)",
        ),
    ),
    (
        "routes[0].canary",
        canary(steps=[0, 50]),
        At("routes[0].canary.steps[0]", "must be a percentage in (0, 100], got 0"),
    ),
    (
        "routes[0].canary",
        canary(steps=[50, 100.5]),
        At("routes[0].canary.steps[1]", "must be a percentage in (0, 100], got 100.5"),
    ),
    (
        "routes[0].canary",
        canary(steps=[5, 50, 25]),
        At("routes[0].canary.steps[2]", "must be greater than the step before (50), got 25"),
    ),
    (
        "routes[0].canary",
        canary(steps=[5, 5]),
        At("routes[0].canary.steps[1]", "must be greater than the step before (5), got 5"),
    ),
    (
        "routes[0].canary",
        canary(steps=["5%"]),
        At("routes[0].canary.steps[0]", "expected a number, got string '5%'"),
    ),
    (
        "routes[0].canary",
        canary(steps="5,50"),
        At("routes[0].canary.steps", "expected a list, got string '5,50'"),
    ),
    (
        "routes[0].canary",
        canary(window_s=0),
        At("routes[0].canary.window_s", "must be greater than 0, got 0"),
    ),
    (
        "routes[0].canary",
        canary(min_samples=0),
        At("routes[0].canary.min_samples", "must be at least 1, got 0"),
    ),
    (
        "routes[0].canary",
        canary(min_samples=10.5),
        At("routes[0].canary.min_samples", "expected an integer, got number 10.5"),
    ),
    (
        "routes[0].canary",
        canary(max_error_rate_increase=1.5),
        At("routes[0].canary.max_error_rate_increase", "must be between 0 and 1, got 1.5"),
    ),
    (
        "routes[0].canary",
        canary(max_ttfb_p95_ratio=0.9),
        At("routes[0].canary.max_ttfb_p95_ratio", "must be at least 1, got 0.9"),
    ),
    (
        "routes[0].canary",
        canary(step_interval_s=0),
        At("routes[0].canary.step_interval_s", "must be greater than 0, got 0"),
    ),
    (
        "routes[0].canary",
        canary(enabled="on"),
        At("routes[0].canary.enabled", "expected true or false, got string 'on'"),
    ),
    (
        "routes[0].canary",
        canary(step=[5]),
        At("routes[0].canary.step", "unknown key (did you mean 'steps'?)"),
    ),
    # route match
    ("routes[0].match.modle", "x", "unknown key (did you mean 'model'?)"),
    ("routes[0].match.path_prefix", "v1/embeddings", "must start with '/', got 'v1/embeddings'"),
    ("routes[0].match.model", "", "must not be empty"),
    (
        "routes[0].match.header",
        {"a": "1", "b": "2"},
        "expected one header as {name: value}, got 2 entries",
    ),
    ("routes[0].match.header", "x-tenant", "expected a mapping, got string 'x-tenant'"),
    ("routes[0].match.header", {"x tenant": "a"}, "invalid header name 'x tenant'"),
    (
        "routes[0].match.header",
        {"x-tenant": 5},
        At(
            "routes[0].match.header.x-tenant",
            "expected a string, got integer 5 (quote it to make it text)",
        ),
    ),
    # rate limits
    (
        "rate_limits.store",
        "redis:6379",
        "must be 'memory' or a redis:// or rediss:// URL, got 'redis:6379'",
    ),
    ("rate_limits.store", "redis://", "Redis URL 'redis://' has no host"),
    ("rate_limits.on_store_error", "block", "unknown on_store_error 'block' (known: allow, deny)"),
    ("rate_limits.rule", [], "unknown key (did you mean 'rules'?)"),
    (
        "rate_limits.rules",
        [{"key": "user", "requests_per_minute": 1}],
        At(
            "rate_limits.rules[0].key",
            "unknown rate limit key 'user' (known: api_key, ip, route, global, header:NAME)",
        ),
    ),
    (
        "rate_limits.rules",
        [{"requests_per_minute": 1}],
        At("rate_limits.rules[0].key", "is required"),
    ),
    (
        "rate_limits.rules",
        [{"key": "ip"}],
        At(
            "rate_limits.rules[0]",
            "set at least one of requests_per_minute, tokens_per_minute, max_concurrent",
        ),
    ),
    (
        "rate_limits.rules",
        [{"key": "ip", "requests_per_minute": 0}],
        At("rate_limits.rules[0].requests_per_minute", "must be greater than 0, got 0"),
    ),
    (
        "rate_limits.rules",
        [{"key": "global", "max_concurrent": 1.5}],
        At("rate_limits.rules[0].max_concurrent", "expected an integer, got number 1.5"),
    ),
    (
        "rate_limits.rules",
        [{"key": "ip", "rpm": 1, "tokens_per_minute": 1}],
        At(
            "rate_limits.rules[0].rpm",
            "unknown key (known: key, requests_per_minute, tokens_per_minute, max_concurrent,"
            " name)",
        ),
    ),
    (
        "rate_limits.rules",
        [{"key": "ip", "requests_per_minute": 1, "name": "per ip"}],
        At("rate_limits.rules[0].name", "rule name 'per ip' must not contain whitespace or '/'"),
    ),
    (
        "rate_limits.rules",
        [
            {"key": "ip", "requests_per_minute": 1, "name": "x"},
            {"key": "global", "max_concurrent": 1, "name": "x"},
        ],
        At("rate_limits.rules[1].name", "duplicate rule name 'x' (also rules[0])"),
    ),
    ("rate_limits.redis_timeout_s", 0, "must be greater than 0, got 0"),
    ("rate_limits.redis_timeout_s", "100ms", "expected a number, got string '100ms'"),
    ("rate_limits.key_prefix", "", "must not be empty"),
    ("rate_limits.key_prefix", 7, "expected a string, got integer 7 (quote it to make it text)"),
    # defaults
    (
        "defaults.backends",
        [],
        "unknown key (known: balancer, hash_key, health, breaker, retry, timeouts,"
        " outlier, autoscale, slow_start_s, panic_mode, api_key)",
    ),
    (
        "defaults.discovery",
        DISCOVERY,
        "unknown key (known: balancer, hash_key, health, breaker, retry, timeouts,"
        " outlier, autoscale, slow_start_s, panic_mode, api_key)",
    ),
    ("defaults.timeouts.idle_s", 0, "must be greater than 0, got 0"),
    (
        "defaults.balancer",
        "rr",
        f"unknown balancer 'rr' (known: {KNOWN_BALANCERS})",
    ),
    # auth
    ("auth", ["alice"], "expected a mapping, got a list"),
    ("auth.enabled", "yes", "expected true or false, got string 'yes'"),
    ("auth.enabled", True, At("auth.keys", "auth is enabled but no key is configured")),
    ("auth.keyz", [], "unknown key (did you mean 'keys'?)"),
    ("auth.keys", key(), "expected a list, got a mapping"),
    ("auth.keys", ["alice"], At("auth.keys[0]", "expected a mapping, got string 'alice'")),
    ("auth.keys", [{"sha256": SHA_A}], At("auth.keys[0].name", "is required")),
    ("auth.keys", [{"name": "alice"}], At("auth.keys[0].sha256", "is required")),
    ("auth.keys", [key(name="")], At("auth.keys[0].name", "must not be empty")),
    (
        "auth.keys",
        [key(name=1)],
        At("auth.keys[0].name", "expected a string, got integer 1 (quote it to make it text)"),
    ),
    (
        "auth.keys",
        [key(sha256="abc")],
        At(
            "auth.keys[0].sha256",
            "must be 64 hex digits (a SHA-256, see 'llmproxy hash-key'), got 3 characters",
        ),
    ),
    (
        "auth.keys",
        [key(sha256="g" * 64)],
        At(
            "auth.keys[0].sha256",
            "must be 64 hex digits (a SHA-256, see 'llmproxy hash-key'), got 64 characters",
        ),
    ),
    ("auth.keys", [key(sha256="A" * 64)], At("auth.keys[0].sha256", "must be lower-case hex")),
    (
        "auth.keys",
        [key(), key(sha256=SHA_B)],
        At("auth.keys[1].name", "duplicate key name 'alice'"),
    ),
    (
        "auth.keys",
        [key(), key(name="bob")],
        At("auth.keys[1].sha256", "the same key is listed twice"),
    ),
    (
        "auth.keys",
        [key(requests_per_minute=0)],
        At("auth.keys[0].requests_per_minute", "must be greater than 0, got 0"),
    ),
    (
        "auth.keys",
        [key(max_concurrent=0.5)],
        At("auth.keys[0].max_concurrent", "expected an integer, got number 0.5"),
    ),
    (
        "auth.keys",
        [key(can_target_pool="yes")],
        At("auth.keys[0].can_target_pool", "expected true or false, got string 'yes'"),
    ),
    (
        "auth.keys",
        [key(rpm=60)],
        At(
            "auth.keys[0].rpm",
            "unknown key (known: name, sha256, requests_per_minute, tokens_per_minute,"
            " max_concurrent, can_target_pool)",
        ),
    ),
    # An entry already reported does not also make "no key is configured".
    ("auth", {"enabled": True, "keys": [{"name": "a"}]}, At("auth.keys[0].sha256", "is required")),
    # access_log
    ("access_log", True, "expected a mapping, got boolean true"),
    ("access_log.path", "", "must be '-' (stdout) or a file path"),
    ("access_log.log_prompts", "no", "expected true or false, got string 'no'"),
    ("access_log.prompt_max_chars", -1, "must be at least 0, got -1"),
    ("access_log.log_prompt", True, "unknown key (did you mean 'log_prompts'?)"),
    # tracing
    ("tracing.enabled", 1, "expected true or false, got integer 1"),
    ("tracing.service_name", " ", "must not be empty"),
    ("tracing.sample_ratio", 1.5, "must be between 0 and 1, got 1.5"),
    ("tracing.sample_ratio", -0.1, "must be between 0 and 1, got -0.1"),
    (
        "tracing.otlp_endpoint",
        "collector:4318",
        "must be an http:// or https:// URL, got 'collector:4318'",
    ),
    (
        "tracing.otlp_endpoint",
        "grpc://collector:4317",
        "must be an http:// or https:// URL, got 'grpc://collector:4317'",
    ),
    ("tracing.otlp_endpoint", "http://:4318/v1/traces", "URL 'http://:4318/v1/traces' has no host"),
    (
        "tracing.otlp_endpoint",
        "http://collector:99999/v1/traces",
        "malformed URL 'http://collector:99999/v1/traces': Port out of range 0-65535",
    ),
]


@pytest.mark.parametrize(("path", "value", "expected"), CASES, ids=[c[0] for c in CASES])
def test_one_error(path: str, value: object, expected: str | At) -> None:
    if isinstance(expected, At):
        message = f"{expected.path}: {expected.message}"
    else:
        message = f"{path}: {expected}"
    assert errors_of(put(base(), path, value)) == [message]


def test_top_level_not_a_mapping() -> None:
    assert errors_of(["pools"]) == ["(top level): expected a mapping, got a list"]
    assert errors_of(None) == ["(top level): the configuration is empty"]


def test_non_string_keys_are_reported() -> None:
    data = base()
    data["pools"][1] = {"backends": ["http://a:1"]}
    assert errors_of(data) == ["pools: keys must be strings, got integer 1"]


def test_unknown_pool_reported_once_per_reference() -> None:
    data = put(base(), "routes[1].pool", "gone")
    data = put(data, "routes[1].fallback", ["gone"])
    assert errors_of(data) == [
        "routes[1].pool: unknown pool 'gone' (known: canary, stable)",
        "routes[1].fallback[0]: unknown pool 'gone' (known: canary, stable)",
    ]


@pytest.mark.parametrize(
    "admin",
    [
        {"host": "127.0.0.2", "port": 8080},
        {"host": "0.0.0.0", "enabled": False},
        {"host": "::1"},
        {"host": "localhost"},
        {"host": "0.0.0.0", "token": "t"},
    ],
)
def test_admin_settings_that_are_fine(admin: dict[str, object]) -> None:
    assert errors_of(put(base(), "admin", admin)) == []


def test_all_errors_are_collected_in_document_order() -> None:
    data = put(base(), "server.port", -5)
    data = put(data, "pools.stable.backends[0]", "nope")
    data = put(data, "routes[0].split[0].pool", "missing")
    data = put(data, "rate_limits.on_store_error", "maybe")
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {})
    expected = [
        "server.port: must be between 0 and 65535, got -5",
        "pools.stable.backends[0]: must be an http:// or https:// URL, got 'nope'",
        "routes[0].split[0].pool: unknown pool 'missing' (known: canary, stable)",
        "rate_limits.on_store_error: unknown on_store_error 'maybe' (known: allow, deny)",
    ]
    assert caught.value.errors == expected
    assert str(caught.value) == "\n".join(expected)
    assert isinstance(caught.value, ValueError)


def test_every_numeric_schema_field_has_a_bound() -> None:
    """A numeric field added to the schema must say what range it accepts."""
    numeric: set[str] = set()
    for obj in vars(schema).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            for name, hint in typing.get_type_hints(obj).items():
                args = hint.__args__ if isinstance(hint, types.UnionType) else (hint,)
                if any(arg in (int, float) for arg in args):
                    numeric.add(name)
    assert numeric - set(BOUNDS) == set()


def test_auth_problems_point_at_the_yaml_entry() -> None:
    """Entries that could not be read do not shift the index of later problems."""
    keys = [{"name": "a"}, key("b"), key("b", SHA_B), key("c", SHA_B)]
    assert errors_of(put(base(), "auth.keys", keys)) == [
        "auth.keys[0].sha256: is required",
        "auth.keys[2].name: duplicate key name 'b'",
        "auth.keys[3].sha256: the same key is listed twice",
    ]


def test_canary_pool_of_a_bad_split_entry_is_reported_once() -> None:
    data = put(base(), "routes[0].split[1].pool", "canry")
    data = put(data, "routes[0].canary", canary(canary_pool="canry"))
    assert errors_of(data) == [
        "routes[0].split[1].pool: unknown pool 'canry' (known: canary, stable)"
    ]


@pytest.mark.parametrize("backends", [DELETE, [], None])
def test_a_pool_with_discovery_needs_no_backends(backends: object) -> None:
    data = put(base(), "pools.stable.discovery", DISCOVERY)
    assert errors_of(put(data, "pools.stable.backends", backends)) == []


def test_a_bad_discovery_does_not_also_ask_for_backends() -> None:
    data = put(base(), "pools.stable", discovered(port=0, scheme="ftp"))
    assert errors_of(data) == [
        "pools.stable.discovery.port: must be between 1 and 65535, got 0",
        "pools.stable.discovery.scheme: unknown scheme 'ftp' (known: http, https)",
    ]
