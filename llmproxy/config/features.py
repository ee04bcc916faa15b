"""The top-level sections of features that sit beside routing: auth, access_log, tracing.

The API-key rules themselves (hash format, duplicates, a key required when
enabled) belong to :mod:`llmproxy.policy.auth`; this module reads the YAML
into the schema, asks that module what is wrong, and puts the YAML path on
each answer.
"""

from __future__ import annotations

import re
from dataclasses import replace

from llmproxy.config.errors import Issues, index_path, key_path
from llmproxy.config.fields import (
    Invalid,
    apply_fields,
    build_section,
    is_null,
    read_list,
    read_mapping,
    read_str,
    require,
)
from llmproxy.config.schema import (
    AccessLogConfig,
    ApiKeyConfig,
    AuthConfig,
    ClusterConfig,
    TracingConfig,
)
from llmproxy.config.values import http_url_problem

_KEY_IDS = ("name", "sha256")
#: A path that ``auth_problems`` gives for one entry of ``keys``.
_KEY_ENTRY = re.compile(r"keys\[(\d+)\](.*)")


def build_auth(value: object, issues: Issues) -> AuthConfig:
    # policy.auth imports the config package, so it cannot be imported at the top.
    from llmproxy.policy.auth import auth_problems  # noqa: PLC0415

    path = "auth"
    if isinstance(value, Invalid) or is_null(value):
        return AuthConfig()
    data = read_mapping(value, path, issues)
    if data is None:
        return AuthConfig()
    rest = {k: v for k, v in data.items() if k != "keys"}
    config = apply_fields(AuthConfig, rest, path, issues, AuthConfig())
    keys_path = key_path(path, "keys")
    items = [] if is_null(data.get("keys")) else read_list(data["keys"], keys_path, issues)
    #: The YAML index of each entry that could be read, in order.
    indexes: list[int] = []
    keys: list[ApiKeyConfig] = []
    for i, item in enumerate(items or ()):
        entry = _read_api_key(item, index_path(keys_path, i), issues)
        if entry is not None:
            indexes.append(i)
            keys.append(entry)
    config = replace(config, keys=tuple(keys))
    # With an entry already reported, "no key is configured" would be a cascade.
    complete = items is not None and len(keys) == len(items)
    checked = config if complete else replace(config, enabled=False)
    for where, message in auth_problems(checked):
        issues.add(_problem_path(keys_path, where, indexes), message)
    return config


def _read_api_key(item: object, path: str, issues: Issues) -> ApiKeyConfig | None:
    """One ``{name, sha256, ...limits}`` entry; ``None`` when its name or hash is unusable."""
    data = read_mapping(item, path, issues)
    if data is None:
        return None
    ids = {
        key: read_str(
            require(data, key, path, issues), key_path(path, key), issues, non_empty=False
        )
        for key in _KEY_IDS
    }
    rest = {k: v for k, v in data.items() if k not in _KEY_IDS}
    entry = apply_fields(ApiKeyConfig, rest, path, issues, ApiKeyConfig(name="", sha256=""))
    name, sha256 = ids["name"], ids["sha256"]
    if isinstance(name, Invalid) or isinstance(sha256, Invalid):
        return None
    return replace(entry, name=name, sha256=sha256)


def _problem_path(keys_path: str, where: str, indexes: list[int]) -> str:
    """``keys[i].x`` from ``auth_problems``, with ``i`` counted among the entries read,
    as the YAML path of that entry."""
    match = _KEY_ENTRY.fullmatch(where)
    if match is None:
        return key_path("auth", where)
    return index_path(keys_path, indexes[int(match[1])]) + match[2]


def build_access_log(value: object, issues: Issues) -> AccessLogConfig:
    config = build_section(AccessLogConfig, value, "access_log", issues, AccessLogConfig())
    if not config.path.strip():
        issues.add("access_log.path", "must be '-' (stdout) or a file path")
    return config


def build_tracing(value: object, issues: Issues) -> TracingConfig:
    config = build_section(TracingConfig, value, "tracing", issues, TracingConfig())
    if not config.service_name.strip():
        issues.add("tracing.service_name", "must not be empty")
    # ``${OTLP_ENDPOINT:-}`` left empty means the exporter's own default.
    endpoint = (config.otlp_endpoint or "").strip() or None
    problem = http_url_problem(endpoint) if endpoint is not None else None
    if problem is not None:
        issues.add("tracing.otlp_endpoint", problem)
    return replace(config, otlp_endpoint=endpoint)


def build_cluster(value: object, issues: Issues) -> ClusterConfig:
    config = build_section(ClusterConfig, value, "cluster", issues, ClusterConfig())
    url = (config.redis or "").strip() or None
    if config.enabled and url is None:
        issues.add("cluster.redis", "is required when cluster.enabled is true (a redis:// URL)")
    elif url is not None and not url.startswith(("redis://", "rediss://")):
        issues.add("cluster.redis", f"must be a redis:// or rediss:// URL, got {url!r}")
    if not config.channel.strip():
        issues.add("cluster.channel", "must not be empty")
    return replace(config, redis=url)
