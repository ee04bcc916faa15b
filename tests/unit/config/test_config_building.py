"""What a valid configuration turns into: defaults, normal forms, merged sections."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from llmproxy.config import Config, parse_config, schema

POOLS = """
pools:
  stable:
    backends: [http://127.0.0.1:9001, http://127.0.0.1:9002]
  canary:
    backends: [{url: "http://127.0.0.1:9003", weight: 2, name: c0}]
"""
ROUTES = """
routes:
  - name: chat
    match: {model: llama-*}
    split: [{pool: stable, weight: 90}, {pool: canary, weight: 10}]
    sticky: header:x-user-id
  - {name: rest, pool: stable}
"""


def build(*sections: str, pools: str = POOLS, routes: str = ROUTES) -> Config:
    text = "\n".join(textwrap.dedent(s) for s in (pools, routes, *sections))
    return parse_config(yaml.safe_load(text), {})


def test_minimal_configuration() -> None:
    config = build()
    assert list(config.pools) == ["stable", "canary"]
    assert config.pools["stable"].name == "stable"
    assert config.pools["canary"].backends == (
        schema.BackendConfig(url="http://127.0.0.1:9003", weight=2.0, name="c0"),
    )
    chat, rest = config.routes
    assert chat == schema.RouteConfig(
        name="chat",
        match=schema.RouteMatch(model="llama-*"),
        split=(schema.SplitTarget("stable", 90.0), schema.SplitTarget("canary", 10.0)),
        sticky="header:x-user-id",
    )
    assert rest.split == (schema.SplitTarget("stable", 1.0),)
    assert (rest.match, rest.sticky, rest.fallback) == (schema.RouteMatch(), "none", ())


def test_optional_sections_default_from_the_dataclasses() -> None:
    config = build()
    assert config.server == schema.ServerConfig()
    assert config.admin == schema.AdminConfig()
    assert config.rate_limits == schema.RateLimitsConfig()
    stable = config.pools["stable"]
    assert (stable.balancer, stable.hash_key) == ("least_connections", "header:x-user-id")
    assert stable.health == schema.HealthConfig()
    assert stable.breaker == schema.BreakerConfig()
    assert stable.retry == schema.RetryConfig()
    assert stable.timeouts == schema.TimeoutsConfig()
    assert config.source is None


def test_source_is_recorded() -> None:
    data = yaml.safe_load(POOLS + ROUTES)
    assert parse_config(data, {}, source="x.yaml").source == "x.yaml"


def test_null_sections_mean_defaults() -> None:
    pools = POOLS.replace(
        "[http://127.0.0.1:9001, http://127.0.0.1:9002]", "[http://a:1]\n    health:"
    )
    config = build("server:\nrate_limits:\n", pools=pools)
    assert config.server == schema.ServerConfig()
    assert config.rate_limits == schema.RateLimitsConfig()
    assert config.pools["stable"].health == schema.HealthConfig()


def test_port_zero_means_any_free_port() -> None:
    assert build("server: {port: 0}").server.port == 0


@pytest.mark.parametrize(
    ("token", "expected"), [('""', None), ('"  "', None), ("s3cret", "s3cret")]
)
def test_admin_token(token: str, expected: str | None) -> None:
    assert build(f"admin: {{token: {token}}}").admin.token == expected


def test_int_accepted_for_float_and_stored_as_float() -> None:
    pools = POOLS + "    timeouts: {idle_s: 5}\n"
    idle = build(pools=pools).pools["canary"].timeouts.idle_s
    assert (idle, type(idle)) == (5.0, float)


@pytest.mark.parametrize("ratio", [0, 1])
def test_budget_ratio_bounds_are_inclusive(ratio: int) -> None:
    pools = POOLS + f"    retry: {{budget_ratio: {ratio}}}\n"
    assert build(pools=pools).pools["canary"].retry.budget_ratio == ratio


def test_backend_forms_and_normalisation() -> None:
    pools = """
    pools:
      stable:
        backends:
          - HTTP://Example.COM
          - https://example.com/
          - {url: "http://[::1]:9000", weight: 3}
          - {url: " http://10.0.0.1:8000 ", name: gpu-1}
      canary:
        backends: [http://c:1]
    """
    backends = build(pools=pools).pools["stable"].backends
    assert [(b.url, b.name, b.weight) for b in backends] == [
        ("http://example.com:80", "example.com:80", 1.0),
        ("https://example.com:443", "example.com:443", 1.0),
        ("http://[::1]:9000", "[::1]:9000", 3.0),
        ("http://10.0.0.1:8000", "gpu-1", 1.0),
    ]


def test_route_match_header_and_fallback() -> None:
    routes = """
    routes:
      - name: eval
        match: {path_prefix: /v1, header: {X-Tenant: acme}}
        pool: canary
        sticky: api_key
        fallback: [stable]
    """
    (route,) = build(routes=routes).routes
    assert route.match == schema.RouteMatch(path_prefix="/v1", header=("x-tenant", "acme"))
    assert (route.sticky, route.fallback) == ("api_key", ("stable",))


def test_header_modes_are_lower_cased() -> None:
    pools = POOLS + "    hash_key: header:X-Session\n"
    routes = ROUTES.replace("header:x-user-id", "header:X-User-Id")
    limits = "rate_limits: {rules: [{key: 'header:X-Team', tokens_per_minute: 10}]}"
    config = build(limits, pools=pools, routes=routes)
    assert config.routes[0].sticky == "header:x-user-id"
    assert config.pools["canary"].hash_key == "header:x-session"
    assert config.rate_limits.rules[0].key == "header:x-team"


def test_rate_limits() -> None:
    limits = build("""
    rate_limits:
      store: rediss://cache.internal:6380/1
      on_store_error: deny
      rules:
        - {key: api_key, requests_per_minute: 600, tokens_per_minute: 200000}
        - {key: global, max_concurrent: 100}
    """).rate_limits
    assert limits == schema.RateLimitsConfig(
        store="rediss://cache.internal:6380/1",
        on_store_error="deny",
        rules=(
            schema.RateLimitRule("api_key", 600.0, 200000.0, None),
            schema.RateLimitRule("global", None, None, 100),
        ),
    )


def test_defaults_apply_to_every_pool_before_its_own_keys() -> None:
    pools = POOLS + "    balancer: random\n    timeouts: {idle_s: 10}\n"
    config = build(
        """
        defaults:
          balancer: power_of_two
          retry: {attempts: 2}
          timeouts: {first_byte_s: 120, idle_s: 60, total_s: 900}
        """,
        pools=pools,
    )
    stable, canary = config.pools["stable"], config.pools["canary"]
    assert stable.timeouts == schema.TimeoutsConfig(2.0, 120.0, 60.0, 900.0)
    assert canary.timeouts == schema.TimeoutsConfig(2.0, 120.0, 10.0, 900.0)
    assert (stable.balancer, canary.balancer) == ("power_of_two", "random")
    assert (stable.retry.attempts, canary.retry.attempts) == (2, 2)
    assert canary.health == schema.HealthConfig()


def test_new_sections_default_from_the_dataclasses() -> None:
    config = build()
    assert config.auth == schema.AuthConfig()
    assert config.access_log == schema.AccessLogConfig()
    assert config.tracing == schema.TracingConfig()
    assert config.server.trust_forwarded_for is False
    assert (config.rate_limits.redis_timeout_s, config.rate_limits.key_prefix) == (
        0.1,
        "llmproxy:rl",
    )
    stable = config.pools["stable"]
    assert (stable.api_key, stable.discovery) == (None, None)
    assert all(route.canary is None for route in config.routes)


def test_auth_keys() -> None:
    sha_a, sha_b = "a" * 64, "b" * 64
    auth = build(f"""
    auth:
      enabled: true
      keys:
        - {{name: alice, sha256: {sha_a}, requests_per_minute: 60}}
        - name: "team: search"
          sha256: {sha_b}
          tokens_per_minute: 1000
          max_concurrent: 4
          can_target_pool: true
    """).auth
    assert auth == schema.AuthConfig(
        enabled=True,
        keys=(
            schema.ApiKeyConfig("alice", sha_a, requests_per_minute=60.0),
            schema.ApiKeyConfig(
                "team: search",
                sha_b,
                tokens_per_minute=1000.0,
                max_concurrent=4,
                can_target_pool=True,
            ),
        ),
    )


def test_an_entry_printed_by_hash_key_loads_and_authenticates() -> None:
    from llmproxy.policy.auth import KeyRing, hash_key_command

    entry = hash_key_command("sk-0123456789abcdefghijklmnop", "ci")
    config = build("auth:\n  enabled: true\n  keys:\n" + textwrap.indent(entry, "    "))
    assert KeyRing(config.auth).authenticate("Bearer sk-0123456789abcdefghijklmnop") is not None


def test_policy_modules_re_export_the_schema_classes() -> None:
    from llmproxy.policy import auth, canary

    assert auth.AuthConfig is schema.AuthConfig
    assert auth.ApiKeyConfig is schema.ApiKeyConfig
    assert canary.CanaryConfig is schema.CanaryConfig


def test_pool_api_key_from_defaults_and_per_pool() -> None:
    pools = """
    pools:
      stable: {api_key: " own ", backends: [http://a:1]}
      canary: {api_key: null, backends: [http://b:1]}
      other: {backends: [http://c:1]}
    """
    config = build("defaults: {api_key: fleet-key}", pools=pools)
    keys = {name: pool.api_key for name, pool in config.pools.items()}
    assert keys == {"stable": "own", "canary": None, "other": "fleet-key"}


def test_pool_api_key_from_an_unset_variable_is_none_and_never_in_repr() -> None:
    data = yaml.safe_load(POOLS + ROUTES + "defaults: {api_key: '${VLLM_API_KEY:-}'}\n")
    assert parse_config(data, {}).pools["stable"].api_key is None
    config = parse_config(data, {"VLLM_API_KEY": "sk-upstream"})
    assert config.pools["stable"].api_key == "sk-upstream"
    assert "sk-upstream" not in repr(config)


def test_pool_discovery() -> None:
    pools = """
    pools:
      stable:
        discovery:
          dns: vllm-headless.llm.svc.cluster.local.
          port: 8000
          scheme: https
          refresh_s: 5
          empty_after: 2
          timeout_s: 1
      canary:
        backends: []
        discovery: {dns: VLLM-Canary, port: 8001}
    """
    config = build(pools=pools)
    stable, canary = config.pools["stable"], config.pools["canary"]
    assert stable.backends == canary.backends == ()
    assert stable.discovery == schema.DiscoveryConfig(
        dns="vllm-headless.llm.svc.cluster.local.",
        port=8000,
        scheme="https",
        refresh_s=5.0,
        empty_after=2,
        timeout_s=1.0,
    )
    assert canary.discovery == schema.DiscoveryConfig(dns="VLLM-Canary", port=8001)


def test_route_canary() -> None:
    routes = ROUTES.replace(
        "    sticky: header:x-user-id\n",
        "    sticky: header:x-user-id\n"
        "    canary:\n"
        "      canary_pool: canary\n"
        "      stable_pool: stable\n"
        "      steps: [10, 50, 100]\n"
        "      window_s: 120\n"
        "      min_samples: 20\n"
        "      max_error_rate_increase: 0\n"
        "      max_ttfb_p95_ratio: 1\n"
        "      step_interval_s: 600\n"
        "      enabled: false\n",
    )
    chat = build(routes=routes).routes[0]
    assert chat.canary == schema.CanaryConfig(
        canary_pool="canary",
        stable_pool="stable",
        window_s=120.0,
        min_samples=20,
        max_error_rate_increase=0.0,
        max_ttfb_p95_ratio=1.0,
        steps=(10.0, 50.0, 100.0),
        step_interval_s=600.0,
        enabled=False,
    )
    assert isinstance(chat.canary.steps[0], float)


def test_a_loaded_canary_is_accepted_by_the_analyser() -> None:
    from llmproxy.policy.canary import CanaryAnalyzer

    routes = ROUTES.replace(
        "    sticky: header:x-user-id\n",
        "    canary: {canary_pool: canary, stable_pool: stable, steps: [10, 100]}\n",
    )
    chat = build(routes=routes).routes[0]
    assert chat.canary is not None
    assert CanaryAnalyzer(chat.canary, lambda: 0.0).weight == 10.0


def test_access_log_and_tracing() -> None:
    config = build("""
    access_log: {enabled: false, path: /var/log/llmproxy.log, log_prompts: true,
                 prompt_max_chars: 0}
    tracing:
      enabled: true
      service_name: gw
      otlp_endpoint: https://collector.internal:4318/v1/traces
      sample_ratio: 0
    """)
    assert config.access_log == schema.AccessLogConfig(False, "/var/log/llmproxy.log", True, 0)
    assert config.tracing == schema.TracingConfig(
        True, "gw", "https://collector.internal:4318/v1/traces", 0.0
    )


def test_empty_otlp_endpoint_means_the_exporter_default() -> None:
    data = yaml.safe_load(POOLS + ROUTES + "tracing: {otlp_endpoint: '${OTLP:-}'}\n")
    assert parse_config(data, {}).tracing.otlp_endpoint is None


def test_rate_limit_and_server_additions() -> None:
    config = build("""
    server: {trust_forwarded_for: true}
    rate_limits:
      redis_timeout_s: 0.25
      key_prefix: "gw:rl"
      rules:
        - {name: per-ip, key: ip, requests_per_minute: 60}
        - {key: global, max_concurrent: 10}
    """)
    assert config.server.trust_forwarded_for is True
    limits = config.rate_limits
    assert (limits.redis_timeout_s, limits.key_prefix) == (0.25, "gw:rl")
    assert [rule.name for rule in limits.rules] == ["per-ip", None]


def test_access_log_and_tracing_sections_are_validated_at_load() -> None:
    from llmproxy.config import ConfigError, parse_config

    base = {"pools": {"p": {"backends": ["http://a:1"]}}, "routes": [{"name": "r", "pool": "p"}]}
    for section, bad, path in [
        ("access_log", {"max_pending": 0}, "access_log.max_pending"),
        ("access_log", {"flush_interval_s": 0}, "access_log.flush_interval_s"),
        ("tracing", {"sample_ratio": 2}, "tracing.sample_ratio"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, section: bad}, {})
        assert any(e.startswith(path) for e in caught.value.errors), caught.value.errors


def test_autoscale_and_cluster_sections() -> None:
    from llmproxy.config import ConfigError, parse_config

    base = {"pools": {"p": {"backends": ["http://a:1"]}}, "routes": [{"name": "r", "pool": "p"}]}
    cfg = parse_config(
        {
            **base,
            "pools": {
                "p": {"backends": ["http://a:1"], "autoscale": {"target_in_flight_per_replica": 4}}
            },
            "cluster": {"enabled": True, "redis": "redis://r:6379/0"},
        },
        {},
    )
    assert cfg.pools["p"].autoscale.target_in_flight_per_replica == 4
    assert cfg.cluster.enabled
    for bad, path in [
        ({"cluster": {"enabled": True}}, "cluster.redis"),
        ({"cluster": {"redis": "http://x"}}, "cluster.redis"),
        (
            {"pools": {"p": {"backends": ["http://a:1"], "autoscale": {"stale_after_s": 1}}}},
            "pools.p.autoscale.stale_after_s",
        ),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, **bad}, {})
        assert any(e.startswith(path) for e in caught.value.errors), caught.value.errors
