"""Resilience: per-backend circuit breakers, retry policy and retry budget."""

from llmproxy.resilience.breaker import Breaker, BreakerSnapshot, BreakerState
from llmproxy.resilience.budget import BudgetSnapshot, RetryBudget
from llmproxy.resilience.retry import (
    JitteredBackoff,
    RetryableError,
    backoff_wait,
    make_retrying,
    parse_retry_after,
)

__all__ = [
    "Breaker",
    "BreakerSnapshot",
    "BreakerState",
    "BudgetSnapshot",
    "JitteredBackoff",
    "RetryBudget",
    "RetryableError",
    "backoff_wait",
    "make_retrying",
    "parse_retry_after",
]
