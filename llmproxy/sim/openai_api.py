"""The OpenAI-compatible API of the simulated replica, shaped like vLLM's.

``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming or not) and
``GET /v1/models``. Errors use the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``; an unknown model is a 404
with vLLM's message.
"""

from __future__ import annotations

import abc
import json
import time
import uuid
from http import HTTPStatus
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

DONE = b"data: [DONE]\n\n"
#: Stands for the token text in the serialised per-token chunk template.
_TEXT_SLOT = "\x00token\x00"


def openai_error(status: int, message: str) -> web.Response:
    try:
        kind = HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        kind = "APIError"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def _common(body: dict[str, Any], cfg: SimConfig) -> tuple[bool, bool]:
    """Checks shared by both endpoints; returns (stream, include_usage)."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise InvalidRequest(400, "model must be a string.")
        if model != cfg.model:
            raise InvalidRequest(404, f"The model `{model}` does not exist.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(400, "stream must be a boolean.")
    n = body.get("n", 1)
    if n != 1:
        raise InvalidRequest(400, "The simulated replica supports only n=1.")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidRequest(400, "Stream options can only be defined when `stream=True`.")
    if not isinstance(options, dict):
        raise InvalidRequest(400, "stream_options must be an object.")
    return stream, options.get("include_usage") is True


def _message_text(message: object) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequest(400, "Each message must be an object with a string `role`.")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise InvalidRequest(400, "Message content must be a string or a list of parts.")


def _plan(prompt: str, prompt_tokens: int, limit: int | None, cfg: SimConfig, stream: bool) -> Plan:
    count = cfg.max_tokens_default if limit is None else limit
    return Plan(
        prompt_tokens=prompt_tokens,
        tokens=generate_tokens(prompt, count),
        finish_reason="stop" if limit is None else "length",
        stream=stream,
    )


def parse_chat(body: dict[str, Any], cfg: SimConfig) -> tuple[Plan, bool]:
    """The plan for a chat request, and whether usage is streamed at the end."""
    stream, include_usage = _common(body, cfg)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(400, "`messages` must be a non-empty list.")
    prompt = "\n".join(_message_text(message) for message in messages)
    limit = positive_int(body, "max_completion_tokens", "max_tokens")
    return _plan(prompt, count_prompt_tokens(prompt), limit, cfg, stream), include_usage


def parse_completion(body: dict[str, Any], cfg: SimConfig) -> tuple[Plan, bool]:
    stream, include_usage = _common(body, cfg)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_tokens = count_prompt_tokens(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    ):
        prompt_tokens, prompt = len(prompt), " ".join(map(str, prompt))
    else:
        raise InvalidRequest(400, "`prompt` must be a string or a list of token ids.")
    limit = positive_int(body, "max_tokens")
    return _plan(prompt, prompt_tokens, limit, cfg, stream), include_usage


class _OpenAIRenderer(abc.ABC):
    """Shared by both endpoints; subclasses say how a choice carries text."""

    object_full = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, plan: Plan, model: str, include_usage: bool) -> None:
        self.plan = plan
        self.model = model
        self.include_usage = include_usage
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        # Token chunks differ only in their text: serialise one once, then splice
        # each text in (this halves the cost of a token on the benchmark path).
        template = sse(self.chunk([self.choice(_TEXT_SLOT, None)]))
        self._before, self._after = template.split(json.dumps(_TEXT_SLOT).encode(), 1)

    @abc.abstractmethod
    def choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """One streamed choice (a delta for chat, text for completions)."""

    @abc.abstractmethod
    def full_choice(self) -> dict[str, Any]:
        """The choice of a non-streamed response."""

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.object_chunk,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = self.plan.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def token_event(self, index: int) -> bytes:
        return self._before + json.dumps(self.plan.tokens[index].text).encode() + self._after

    def stream_end(self) -> bytes:
        events = [sse(self.chunk([self.choice(None, self.plan.finish_reason)]))]
        if self.include_usage:
            final = self.chunk([])
            final["usage"] = self.usage(len(self.plan.tokens))
            events.append(sse(final))
        events.append(DONE)
        return b"".join(events)

    def full_body(self) -> bytes:
        body = {
            "id": self.id,
            "object": self.object_full,
            "created": self.created,
            "model": self.model,
            "choices": [self.full_choice()],
            "usage": self.usage(len(self.plan.tokens)),
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def error(self, status: int, message: str) -> web.Response:
        return openai_error(status, message)


class ChatRenderer(_OpenAIRenderer):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def token_event(self, index: int) -> bytes:
        event = super().token_event(index)
        if index:
            return event
        # Like vLLM: a first chunk that carries only the role.
        role = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse(self.chunk([role])) + event

    def full_choice(self) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": self.plan.text},
            "logprobs": None,
            "finish_reason": self.plan.finish_reason,
        }


class CompletionRenderer(_OpenAIRenderer):
    object_full = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def full_choice(self) -> dict[str, Any]:
        return self.choice(self.plan.text, self.plan.finish_reason)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    with replica.track(request) as ticket:
        try:
            plan, include_usage = parse_chat(await read_json_object(request), replica.cfg)
        except InvalidRequest as exc:
            ticket.outcome = Outcome.REJECTED
            return openai_error(exc.status, exc.message)
        render = ChatRenderer(plan, replica.cfg.model, include_usage)
        return await run_generation(request, replica, ticket, plan, render)


async def completions(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    with replica.track(request) as ticket:
        try:
            plan, include_usage = parse_completion(await read_json_object(request), replica.cfg)
        except InvalidRequest as exc:
            ticket.outcome = Outcome.REJECTED
            return openai_error(exc.status, exc.message)
        render = CompletionRenderer(plan, replica.cfg.model, include_usage)
        return await run_generation(request, replica, ticket, plan, render)


async def models(request: web.Request) -> web.Response:
    model = request.app[REPLICA].cfg.model
    card = {
        "id": model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": model,
        "parent": None,
    }
    return web.json_response({"object": "list", "data": [card]})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.get("/v1/models", models),
    ]
