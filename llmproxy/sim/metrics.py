"""Prometheus metrics of the simulated replica, under vLLM's names.

Gateways and autoscalers read ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` from real
replicas; the simulator exposes the same names, with the ``model_name`` label,
from its own registry (several replicas can live in one test process).
The gauges are read from the concurrency gate at scrape time, so they can
never drift from what the replica is doing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from llmproxy.sim.gate import ConcurrencyGate

#: vLLM's default ``max_num_seqs``: the cache counts as full at this many
#: running requests when the replica has no concurrency cap.
DEFAULT_CAPACITY = 256


class SimMetrics:
    def __init__(self, model: str, gate: ConcurrencyGate) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        capacity = gate.limit if gate.limit > 0 else DEFAULT_CAPACITY

        running = Gauge(
            "vllm:num_requests_running",
            "Number of requests currently generating.",
            labels,
            registry=self.registry,
        )
        running.labels(model).set_function(lambda: gate.running)
        waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting for a generation slot.",
            labels,
            registry=self.registry,
        )
        waiting.labels(model).set_function(lambda: gate.waiting)
        kv_cache = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage, 1 means full (simulated: running / capacity).",
            labels,
            registry=self.registry,
        )
        kv_cache.labels(model).set_function(lambda: min(1.0, gate.running / capacity))

        success = Counter(
            "vllm:request_success",
            "Requests that finished generating, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._success_length = success.labels(model, "length")
        self._success_stop = success.labels(model, "stop")
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens processed.",
            labels,
            registry=self.registry,
        ).labels(model)
        self._generation_tokens = Counter(
            "vllm:generation_tokens",
            "Tokens generated (including those of cut or cancelled responses).",
            labels,
            registry=self.registry,
        ).labels(model)

    def record_finished(self, finish_reason: str, prompt_tokens: int) -> None:
        """A response was sent in full; ``finish_reason`` is "length" or "stop"."""
        (self._success_length if finish_reason == "length" else self._success_stop).inc()
        self._prompt_tokens.inc(prompt_tokens)

    def record_tokens(self, count: int) -> None:
        self._generation_tokens.inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
