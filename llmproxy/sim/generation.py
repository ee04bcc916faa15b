"""The life of one generation request, shared by the OpenAI and TGI dialects.

Order of events, chosen to match a real vLLM server:

1. the handler reads and validates the body (errors: 400/404/422, at once);
2. ``hang``: the request is never answered, until the client leaves;
3. ``error_rate``: an error status, at once (a replica failing fast);
4. a stream sends its headers now, then waits for a slot in the FIFO queue
   (the headers of a real vLLM stream go out before the engine schedules it);
5. after the time to first token, one token per gap, each written and flushed
   as its own event; ``cut_after_tokens`` closes the connection mid-way.

With ``ttft_ms = 0`` and ``tokens_per_s = 0`` nothing sleeps: the fast path
costs only what aiohttp costs.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from llmproxy.sim.state import Outcome, Replica, Ticket
from llmproxy.sim.textgen import Token

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
INJECTED_MESSAGE = "Simulated failure injected by the llmproxy sim (error_rate)."


class InvalidRequest(ValueError):
    """The client's mistake; each dialect renders it in its own error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Plan:
    """What the replica will generate for one valid request."""

    prompt_tokens: int
    tokens: list[Token]
    #: "length" when the client's token limit ended it, "stop" otherwise.
    finish_reason: str
    stream: bool

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)


class Renderer(Protocol):
    """How one API dialect writes a :class:`Plan` on the wire."""

    def token_event(self, index: int) -> bytes:
        """The SSE event(s) carrying token ``index``, ``data: ...\\n\\n`` framed."""
        ...

    def stream_end(self) -> bytes:
        """Everything after the last token: final chunk, usage, ``[DONE]``..."""
        ...

    def full_body(self) -> bytes:
        """The JSON body of a non-streaming response."""
        ...

    def error(self, status: int, message: str) -> web.Response: ...


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(400, "The request body must be a JSON object.")
    return body


def positive_int(body: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` present and not null in ``body``; must be an int >= 1."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(400, f"{name} must be an integer >= 1, got {value!r}.")
        return value
    return None


async def run_generation(
    request: web.Request, replica: Replica, ticket: Ticket, plan: Plan, render: Renderer
) -> web.StreamResponse:
    cfg = replica.cfg
    if cfg.hang:
        await replica.hang()
    if replica.should_fail():
        ticket.outcome = Outcome.ERROR_INJECTED
        return render.error(cfg.error_status, INJECTED_MESSAGE)
    # Read once: a fault switched mid-request applies to the next request.
    cut = cfg.cut_after_tokens
    if plan.stream:
        return await _stream(request, replica, ticket, plan, render, cut=cut)
    return await _whole(request, replica, ticket, plan, render, cut=cut)


async def _stream(
    request: web.Request,
    replica: Replica,
    ticket: Ticket,
    plan: Plan,
    render: Renderer,
    *,
    cut: int | None,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    count = len(plan.tokens) if cut is None else min(cut, len(plan.tokens))
    written = 0
    try:
        await response.prepare(request)
        async with replica.gate.slot():
            for index in range(count):
                delay = replica.first_token_delay() if index == 0 else replica.token_gap()
                if delay > 0:
                    await asyncio.sleep(delay)
                await response.write(render.token_event(index))
                written += 1
            if cut is not None:
                _cut(request, response, ticket)
                return response
            await response.write(render.stream_end())
            await response.write_eof()
    except ConnectionResetError:
        # The client went away while we wrote (a cancellation while we slept
        # is counted by the ticket).
        ticket.outcome = Outcome.CANCELLED
        return response
    finally:
        replica.metrics.record_tokens(written)
    replica.metrics.record_finished(plan.finish_reason, plan.prompt_tokens)
    return response


async def _whole(
    request: web.Request,
    replica: Replica,
    ticket: Ticket,
    plan: Plan,
    render: Renderer,
    *,
    cut: int | None,
) -> web.StreamResponse:
    count = len(plan.tokens) if cut is None else min(cut, len(plan.tokens))
    async with replica.gate.slot():
        if count:
            delay = replica.first_token_delay() + replica.token_gap() * (count - 1)
            if delay > 0:
                await asyncio.sleep(delay)
    replica.metrics.record_tokens(count)
    body = render.full_body()
    if cut is None:
        replica.metrics.record_finished(plan.finish_reason, plan.prompt_tokens)
        return web.Response(body=body, content_type="application/json")
    # Promise the whole body, send half of it, hang up.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    try:
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
    except ConnectionResetError:
        ticket.outcome = Outcome.CANCELLED
        return response
    _cut(request, response, ticket)
    return response


def _cut(request: web.Request, response: web.StreamResponse, ticket: Ticket) -> None:
    """Close the connection: what was written is flushed, then FIN, no proper end."""
    ticket.outcome = Outcome.CUT
    response.force_close()
    transport = request.transport
    if transport is not None:
        transport.close()
