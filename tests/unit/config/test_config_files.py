"""Reading files: the shipped configs, YAML syntax errors, unreadable files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmproxy.config import ConfigError, DiscoveryConfig, check_config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[3] / "config"
VALID = (
    "pools:\n  main:\n    backends: [http://127.0.0.1:9001]\nroutes:\n  - {name: all, pool: main}\n"
)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_errors(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env or {})
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


# -- the shipped configuration files ------------------------------------------


def test_dev_config_loads_without_environment() -> None:
    config = load_config(CONFIG_DIR / "dev.yaml", env={})
    assert config.source == os.fspath(CONFIG_DIR / "dev.yaml")
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert (config.admin.port, config.admin.token) == (8081, "dev-admin-token")
    (pool,) = config.pools.values()
    assert [b.url for b in pool.backends] == [
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9002",
        "http://127.0.0.1:9003",
    ]
    (route,) = config.routes
    assert route.match.model == "*"
    assert route.split[0].pool == pool.name


def test_dev_config_takes_the_admin_token_from_the_environment() -> None:
    config = load_config(CONFIG_DIR / "dev.yaml", env={"LLMPROXY_ADMIN_TOKEN": "t0k"})
    assert config.admin.token == "t0k"


def test_staging_config_loads() -> None:
    config = load_config(CONFIG_DIR / "staging.yaml", env={})
    assert config.rate_limits.store == "redis://redis:6379/0"
    canary = next(r for r in config.routes if len(r.split) == 2)
    assert [(t.pool, t.weight) for t in canary.split] == [
        ("llama-3-70b-stable", 95.0),
        ("llama-3-70b-canary", 5.0),
    ]
    assert canary.sticky == "header:x-user-id"
    assert canary.canary is not None
    assert canary.canary.steps == (5.0, 50.0, 100.0)
    assert config.pools["embeddings"].backends == ()
    assert config.pools["embeddings"].discovery is not None
    assert config.pools["embeddings"].api_key is None
    assert config.auth.enabled
    assert [key.name for key in config.auth.keys] == ["ci-smoke", "search-team"]
    assert config.tracing.enabled is False


def test_staging_takes_the_upstream_key_and_tracing_switch_from_the_environment() -> None:
    env = {"VLLM_API_KEY": "sk-vllm", "TRACING_ENABLED": "true"}
    config = load_config(CONFIG_DIR / "staging.yaml", env=env)
    assert config.pools["llama-3-8b"].api_key == "sk-vllm"
    assert config.pools["embeddings"].api_key is None
    assert config.tracing.enabled is True


def test_staging_refuses_an_exposed_admin_api_without_a_token() -> None:
    assert check_config(CONFIG_DIR / "staging.yaml", env={"ADMIN_HOST": "0.0.0.0"}) == [
        "admin.token: is required when admin.host (0.0.0.0) is not a loopback address"
    ]


def test_prod_config_loads_with_its_environment() -> None:
    env = {"LLMPROXY_ADMIN_TOKEN": "s3cret", "REDIS_URL": "rediss://redis.prod:6380/2"}
    config = load_config(CONFIG_DIR / "prod.yaml", env=env)
    assert config.admin.token == "s3cret"
    assert config.rate_limits.store == "rediss://redis.prod:6380/2"
    stable = config.pools["llama-3-70b-stable"]
    assert (stable.timeouts.first_byte_s, stable.timeouts.idle_s, stable.timeouts.total_s) == (
        120.0,
        60.0,
        900.0,
    )
    assert stable.backends[0].url == "http://vllm-llama-70b-0.vllm.svc.cluster.local:8000"
    embeddings = next(r for r in config.routes if r.name == "embeddings")
    assert embeddings.match.path_prefix == "/v1/embeddings"
    assert all(r.fallback for r in config.routes if r.name.startswith("llama"))
    canary = next(r for r in config.routes if r.name == "llama-3-70b").canary
    assert canary is not None
    assert (canary.canary_pool, canary.stable_pool) == ("llama-3-70b-canary", "llama-3-70b-stable")
    assert canary.steps == (5.0, 25.0, 50.0, 100.0)
    assert config.pools["embeddings"].discovery == DiscoveryConfig(
        dns="tei-bge-large-headless.vllm.svc.cluster.local", port=8080, timeout_s=2.0
    )
    assert stable.api_key is None  # VLLM_API_KEY is not set
    assert config.server.trust_forwarded_for
    assert config.auth.enabled
    assert len(config.auth.keys) == 3
    assert config.access_log.log_prompts is False
    assert config.tracing.sample_ratio == 0.05
    assert [rule.name for rule in config.rate_limits.rules] == ["per-key", "per-ip", "fleet"]


def test_prod_config_requires_the_admin_token() -> None:
    assert check_config(CONFIG_DIR / "prod.yaml", env={}) == [
        "admin.token: environment variable LLMPROXY_ADMIN_TOKEN is not set and has no default"
    ]


@pytest.mark.parametrize("name", ["dev.yaml", "staging.yaml", "prod.yaml"])
def test_shipped_configs_check_clean(name: str) -> None:
    assert check_config(CONFIG_DIR / name, env={"LLMPROXY_ADMIN_TOKEN": "x"}) == []


# -- reading and parsing ------------------------------------------------------


def test_check_config_returns_all_errors(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "server: {port: -1, hots: x}\n")
    assert check_config(path, env={}) == [
        "server.hots: unknown key (did you mean 'host'?)",
        "server.port: must be between 0 and 65535, got -1",
    ]
    assert check_config(write(tmp_path, VALID, "ok.yaml"), env={}) == []


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "pools:\n  main:\n    backends: [http://a:1\nroutes: []\n")
    assert load_errors(path) == [
        f"{path}: invalid YAML at line 4, column 7: expected ',' or ']', but got ':'"
        " (while parsing a flow sequence at line 3, column 15)"
    ]


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "pools:\n  main: {}\n bad: 1\n")
    (message,) = load_errors(path)
    assert message.startswith(f"{path}: invalid YAML at line 3, column 2: ")


def test_unquoted_variable_in_flow_mapping_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "admin: {token: ${TOKEN}}\n")
    (message,) = load_errors(path)
    assert message.startswith(f"{path}: invalid YAML at line 1, column 17:")
    assert message.endswith('; inside {...} or [...] a ${VAR} must be quoted: "${VAR}"')


def test_quoted_variable_in_flow_mapping_works(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + 'admin: {port: "${ADMIN_PORT:-9091}", token: "${T}"}\n')
    config = load_config(path, env={"T": "abc"})
    assert (config.admin.port, config.admin.token) == (9091, "abc")


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    text = VALID + "  - {name: other, pool: main}\npools:\n  main: {}\n"
    path = write(tmp_path, "server: {port: 1, port: 2}\n" + text)
    assert load_errors(path) == [
        f"{path}: line 1, column 19: duplicate key 'port' (first at line 1, column 10)",
        f"{path}: line 8, column 1: duplicate key 'pools' (first at line 2, column 1)",
    ]


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = (
        "x-backend: &backend {url: 'http://a:1', weight: 1}\n"
        "pools:\n"
        "  main:\n"
        "    backends:\n"
        "      - {<<: *backend, weight: 3}\n"
        "routes: [{name: all, pool: main}]\n"
    )
    errors = check_config(write(tmp_path, text), env={})
    assert errors == [
        "x-backend: unknown key (known: server, admin, defaults, pools, routes, rate_limits,"
        " auth, access_log, tracing, cluster)"
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert load_errors(path) == [f"{path}: no such file"]
    assert check_config(path) == [f"{path}: no such file"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert load_errors(tmp_path) == [f"{tmp_path}: is a directory, not a file"]


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    assert load_errors(path) == [f"{path}: the file is empty"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"pools: \xff\n")
    assert load_errors(path) == [f"{path}: not valid UTF-8 (byte 7)"]


def test_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "pools: !!python/object:os.system {}\n")
    (message,) = load_errors(path)
    assert message.startswith(f"{path}: invalid YAML at line 1, column 8: could not determine")


def test_error_carries_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "server: {port: x}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.source == str(path)
    assert caught.value.errors == ["server.port: expected an integer, got string 'x'"]


@pytest.mark.parametrize("value", ["*", "*foo"])
def test_unquoted_star_gets_a_hint(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"routes:\n  - match:\n      model: {value}\n")
    (message,) = load_errors(path)
    assert message.startswith(f"{path}: invalid YAML at line 3, column ")
    assert message.endswith("""; a value starting with '*' must be quoted, e.g. model: "*\"""")
