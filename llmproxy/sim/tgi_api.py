"""The Hugging Face TGI API of the simulated replica.

``POST /generate``, ``POST /generate_stream`` and ``GET /info``, in TGI's
shapes: errors are ``{"error": "...", "error_type": "..."}`` (422 for
validation), a stream is one ``data:`` event per token, the last carrying
``generated_text``, and no ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from llmproxy.sim.config import SimConfig
from llmproxy.sim.generation import (
    InvalidRequest,
    Plan,
    positive_int,
    read_json_object,
    run_generation,
    sse,
)
from llmproxy.sim.state import REPLICA, Outcome
from llmproxy.sim.textgen import count_prompt_tokens, generate_tokens

#: TGI names the natural end of a generation differently from OpenAI.
_FINISH_REASONS = {"length": "length", "stop": "eos_token"}


def tgi_error(status: int, message: str) -> web.Response:
    if status == 429:
        kind = "overloaded"
    elif status < 500:
        kind = "validation"
    else:
        kind = "generation"
    return web.json_response({"error": message, "error_type": kind}, status=status)


def parse_generate(body: dict[str, Any], cfg: SimConfig, stream: bool) -> tuple[Plan, bool]:
    """The plan of a TGI request, and whether ``details`` were asked for."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise InvalidRequest(422, "Input validation error: `inputs` cannot be empty")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest(422, "`parameters` must be an object")
    try:
        limit = positive_int(parameters, "max_new_tokens")
    except InvalidRequest as exc:
        raise InvalidRequest(422, f"Input validation error: {exc.message}") from None
    count = cfg.max_tokens_default if limit is None else limit
    plan = Plan(
        prompt_tokens=count_prompt_tokens(inputs),
        tokens=generate_tokens(inputs, count),
        finish_reason="stop" if limit is None else "length",
        stream=stream,
    )
    return plan, parameters.get("details") is True


class TGIRenderer:
    def __init__(self, plan: Plan, details: bool) -> None:
        self.plan = plan
        self.details = details

    def _details(self) -> dict[str, Any]:
        return {
            "finish_reason": _FINISH_REASONS[self.plan.finish_reason],
            "generated_tokens": len(self.plan.tokens),
            "seed": None,
        }

    def token_event(self, index: int) -> bytes:
        token = self.plan.tokens[index]
        last = index == len(self.plan.tokens) - 1
        return sse(
            {
                "index": index + 1,
                "token": {
                    "id": token.id,
                    "text": token.text,
                    "logprob": token.logprob,
                    "special": False,
                },
                "generated_text": self.plan.text if last else None,
                "details": self._details() if last and self.details else None,
                "top_tokens": None,
            }
        )

    def stream_end(self) -> bytes:
        return b""

    def full_body(self) -> bytes:
        body: dict[str, Any] = {"generated_text": self.plan.text}
        if self.details:
            details = self._details()
            details["prefill"] = []
            details["tokens"] = [
                {"id": t.id, "text": t.text, "logprob": t.logprob, "special": False}
                for t in self.plan.tokens
            ]
            body["details"] = details
        return json.dumps(body, separators=(",", ":")).encode()

    def error(self, status: int, message: str) -> web.Response:
        return tgi_error(status, message)


async def _handle(request: web.Request, stream: bool) -> web.StreamResponse:
    replica = request.app[REPLICA]
    with replica.track(request) as ticket:
        try:
            body = await read_json_object(request)
            plan, details = parse_generate(body, replica.cfg, stream)
        except InvalidRequest as exc:
            ticket.outcome = Outcome.REJECTED
            return tgi_error(exc.status, exc.message)
        return await run_generation(request, replica, ticket, plan, TGIRenderer(plan, details))


async def generate(request: web.Request) -> web.StreamResponse:
    return await _handle(request, stream=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _handle(request, stream=True)


async def info(request: web.Request) -> web.Response:
    cfg = request.app[REPLICA].cfg
    return web.json_response(
        {
            "model_id": cfg.model,
            "model_sha": None,
            "model_dtype": "torch.float16",
            "model_device_type": "cuda",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": cfg.max_concurrency or 128,
            "max_best_of": 2,
            "max_stop_sequences": 4,
            "max_input_tokens": 4095,
            "max_total_tokens": 4096,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": "llmproxy-sim",
            "sha": None,
            "docker_label": None,
        }
    )


def routes() -> list[web.RouteDef]:
    return [
        web.post("/generate", generate),
        web.post("/generate_stream", generate_stream),
        web.get("/info", info),
    ]
