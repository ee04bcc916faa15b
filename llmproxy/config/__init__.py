"""Configuration: the schema, and the one loader that builds it from YAML."""

from llmproxy.config.errors import ConfigError
from llmproxy.config.loader import check_config, load_config, parse_config
from llmproxy.config.schema import (
    BALANCERS,
    AdminConfig,
    BackendConfig,
    BreakerConfig,
    Config,
    HealthConfig,
    PoolConfig,
    RateLimitRule,
    RateLimitsConfig,
    RetryConfig,
    RouteConfig,
    RouteMatch,
    ServerConfig,
    SplitTarget,
    TimeoutsConfig,
)

__all__ = [
    "BALANCERS",
    "AdminConfig",
    "BackendConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "HealthConfig",
    "PoolConfig",
    "RateLimitRule",
    "RateLimitsConfig",
    "RetryConfig",
    "RouteConfig",
    "RouteMatch",
    "ServerConfig",
    "SplitTarget",
    "TimeoutsConfig",
    "check_config",
    "load_config",
    "parse_config",
]
