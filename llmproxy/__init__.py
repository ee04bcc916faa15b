"""llmproxy: a resilient load-balancing reverse proxy for LLM inference."""

__version__ = "0.1.0"
