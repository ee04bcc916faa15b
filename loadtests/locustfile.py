"""Locust users that call the OpenAI chat API through llmproxy, streamed and not.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \\
        [--model M] [--prompt-words N] [--max-tokens N] [--stream-ratio R] [--api-key K]

Every option can also come from a Locust config file (the key without ``--``)
or from the environment; the command line wins over the environment, which
wins over a config file:

    --model             LLMPROXY_MODEL            model sent in each request (sim-model)
    --prompt-words      LLMPROXY_PROMPT_WORDS     words in the user message (32)
    --max-tokens        LLMPROXY_MAX_TOKENS       ``max_tokens`` asked for (64)
    --stream-ratio      LLMPROXY_STREAM_RATIO     share of streamed requests, 0..1 (0.5);
                                                  it sets the weights of the two tasks
    --api-key           LLMPROXY_API_KEY          bearer token sent, if any
    --request-timeout   LLMPROXY_REQUEST_TIMEOUT  seconds to connect, and between two reads (60)

Rows in Locust's statistics:

    POST chat         a non-streamed completion; time = the whole response
    POST chat-stream  a streamed completion; time = until ``data: [DONE]``
    TTFT chat-stream  time to first token: ms from sending the request to the
                      first SSE event that carries content
    TPS  chat-stream  decode speed of one stream in tokens/s (the "ms" columns hold
                      tokens/s): (content events - 1) / (last one - first one);
                      recorded for streams of two tokens or more

The TTFT and TPS rows are custom request events, so Locust's "Aggregated" row
counts them too: count requests from the two POST rows.

HttpUser (requests) is used rather than FastHttpUser: geventhttpclient's
``iter_content`` waits until a whole chunk_size of bytes has arrived, which
would hide the time of the first token, whereas requests' ``iter_content(None)``
hands over each HTTP chunk as it arrives.

A failed request's message starts with its kind, which the run scripts count
(``loadtests/chaos_under_load.py``):

    pre-first-byte:   no body byte reached the client (error status, connection
                      error, empty body): the gateway should have retried these
    sse-error-event:  the stream started, then ended with ``data: {"error": ...}``,
                      the gateway's visible end of a stream it could no longer serve
    truncated:        the stream started and stopped without [DONE] nor error event
    bad-response:     a 200 whose body is not what the OpenAI API promises
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

# Locust first: it gevent-patches the standard library, which must happen before
# requests loads ssl (the locust command imports it first; other importers may not).
from locust import HttpUser, TaskSet, events, task

# isort: split
import requests

CHAT_PATH = "/v1/chat/completions"
FAILURE_KINDS = ("pre-first-byte", "sse-error-event", "truncated", "bad-response")
#: Words the prompts are made of; each user starts at its own offset.
VOCABULARY = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
    "seven", "gray", "wolves", "watch", "from", "distant", "hills", "under", "pale",
    "winter", "light", "and", "rivers", "carry", "old", "songs", "toward", "the", "sea",
)  # fmt: skip
#: Longest piece of an error message kept in a failure's name; Locust groups
#: failures by their message, so it must not grow with every request.
MESSAGE_CHARS = 120


def _bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not within [{low}, {high}]")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    """Options of these users; ``parser`` is Locust's configargparse parser."""
    add = parser.add_argument
    add("--model", env_var="LLMPROXY_MODEL", default="sim-model", help="model to ask for")
    add(
        "--prompt-words",
        env_var="LLMPROXY_PROMPT_WORDS",
        type=_bounded(int, 1, 1e6),
        default=32,
        help="words in the user message",
    )
    add(
        "--max-tokens",
        env_var="LLMPROXY_MAX_TOKENS",
        type=_bounded(int, 1, 1e6),
        default=64,
        help="max_tokens of each request",
    )
    add(
        "--stream-ratio",
        env_var="LLMPROXY_STREAM_RATIO",
        type=_bounded(float, 0, 1),
        default=0.5,
        help="share of requests that stream (0..1)",
    )
    add("--api-key", env_var="LLMPROXY_API_KEY", default="", help="bearer token, if any")
    add(
        "--request-timeout",
        env_var="LLMPROXY_REQUEST_TIMEOUT",
        type=_bounded(float, 0.1, 1e6),
        default=60.0,
        help="seconds to connect, and between two reads",
    )


@dataclass(frozen=True, slots=True)
class Settings:
    model: str = "sim-model"
    prompt_words: int = 32
    max_tokens: int = 64
    stream_ratio: float = 0.5
    api_key: str = ""
    request_timeout: float = 60.0

    @classmethod
    def from_options(cls, options: argparse.Namespace | None) -> Settings:
        """Settings from Locust's parsed options (defaults where one is missing)."""
        values = {f.name: getattr(options, f.name, None) for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})


def make_prompt(words: int, offset: int) -> str:
    return " ".join(VOCABULARY[(offset + i) % len(VOCABULARY)] for i in range(words))


def failure(kind: str, detail: object) -> str:
    assert kind in FAILURE_KINDS, kind
    return f"{kind}: {str(detail)[:MESSAGE_CHARS]}"


def error_message(body: bytes | str) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the body's start."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return text[:MESSAGE_CHARS]


@dataclass(slots=True)
class StreamResult:
    """What one SSE response carried. Times are ``time.perf_counter()`` seconds."""

    started: float
    ended: float = 0.0
    body_bytes: int = 0
    first_token: float | None = None
    last_token: float | None = None
    #: Events that carried content; the sim and vLLM send one token per event.
    content_events: int = 0
    done: bool = False
    #: ``None`` when the stream is valid, else a :func:`failure` message.
    problem: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.started) * 1000

    @property
    def tokens_per_s(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.content_events < 2:
            return None
        span = self.last_token - self.first_token
        return (self.content_events - 1) / span if span > 0 else None


def _on_event(result: StreamResult, payload: bytes, now: float) -> bool:
    """Account one ``data:`` payload; returns False when the stream must end here."""
    if payload == b"[DONE]":
        result.done = True
        return False
    try:
        event = json.loads(payload)
    except ValueError:
        result.problem = failure("bad-response", f"SSE data is not JSON: {payload[:60]!r}")
        return False
    if not isinstance(event, dict):
        result.problem = failure("bad-response", "SSE data is not a JSON object")
        return False
    if "error" in event:
        result.problem = failure("sse-error-event", error_message(payload))
        return False
    choices = event.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            result.content_events += 1
            result.last_token = now
            if result.first_token is None:
                result.first_token = now
    return True


def read_stream(response: requests.Response, started: float) -> StreamResult:
    """Read an SSE body as it arrives and judge it; never raises on a bad stream."""
    result = StreamResult(started=started)
    buffer = b""
    reading = True
    try:
        for chunk in response.iter_content(chunk_size=None):
            now = time.perf_counter()
            result.body_bytes += len(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    reading = _on_event(result, line[5:].strip(), now)
                    if not reading:
                        break
            if not reading:
                break
    except (requests.RequestException, OSError) as exc:
        kind = "truncated" if result.body_bytes else "pre-first-byte"
        result.problem = result.problem or failure(kind, f"{type(exc).__name__}: {exc}")
    finally:
        response.close()
    result.ended = time.perf_counter()
    if result.problem is None:
        if not result.body_bytes:
            result.problem = failure("pre-first-byte", "empty body")
        elif not result.done:
            result.problem = failure("truncated", "ended without [DONE] nor an error event")
        elif not result.content_events:
            result.problem = failure("bad-response", "no content before [DONE]")
    return result


def check_completion(response: requests.Response) -> str | None:
    """``None`` for a valid non-streamed chat completion, else a failure message."""
    if not response.status_code:
        return failure("pre-first-byte", f"connection error: {getattr(response, 'error', '')}")
    if response.status_code != 200:
        return failure(
            "pre-first-byte",
            f"HTTP {response.status_code}: {error_message(response.content or b'')}",
        )
    try:
        body = response.json()
        content = body["choices"][0]["message"]["content"]
        completion_tokens = body["usage"]["completion_tokens"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return failure("bad-response", f"not a chat completion ({type(exc).__name__}: {exc})")
    if not isinstance(content, str) or not isinstance(completion_tokens, int):
        return failure("bad-response", "choices[0].message.content or usage is malformed")
    return None


class ChatUser(HttpUser):
    """One client in a closed loop: a chat completion, then the next, no think time."""

    def on_start(self) -> None:
        self.settings = Settings.from_options(self.environment.parsed_options)
        self.tasks = weighted_tasks(self.settings.stream_ratio)
        self.prompt = make_prompt(self.settings.prompt_words, random.randrange(len(VOCABULARY)))
        self.headers = (
            {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        )
        self.timeout = self.settings.request_timeout

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.settings.max_tokens,
            "stream": stream,
        }
        if stream:  # as clients that count tokens ask (the final chunk carries usage)
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def chat(self) -> None:
        with self.client.post(
            CHAT_PATH,
            json=self.body(stream=False),
            name="chat",
            headers=self.headers,
            timeout=self.timeout,
            catch_response=True,
        ) as response:
            problem = check_completion(response)
            if problem:
                response.failure(problem)
            else:
                response.success()

    @task
    def chat_stream(self) -> None:
        headers = {**self.headers, "Accept": "text/event-stream", "Accept-Encoding": "identity"}
        started = time.perf_counter()
        with self.client.post(
            CHAT_PATH,
            json=self.body(stream=True),
            name="chat-stream",
            headers=headers,
            timeout=self.timeout,
            stream=True,
            catch_response=True,
        ) as response:
            content_type = response.headers.get("Content-Type", "")
            if response.status_code == 200 and not content_type.startswith("text/event-stream"):
                problem = failure("bad-response", f"a stream answered as {content_type!r}")
                result = StreamResult(started=started, problem=problem)
            elif response.status_code == 200:
                result = read_stream(response, started)
                # Locust timed the headers only; report the whole stream instead.
                response.request_meta["response_time"] = (result.ended - started) * 1000
                response.request_meta["response_length"] = result.body_bytes
            else:
                result = StreamResult(started=started, problem=check_completion(response))
            if result.problem:
                response.failure(result.problem)
            else:
                response.success()
        if result.ttft_ms is not None:
            self.record("TTFT", result.ttft_ms)
        if result.tokens_per_s is not None:
            self.record("TPS", result.tokens_per_s)

    def record(self, kind: str, value: float) -> None:
        """A custom stats row ``kind chat-stream`` whose "response time" is ``value``."""
        self.environment.events.request.fire(
            request_type=kind,
            name="chat-stream",
            response_time=value,
            response_length=0,
            exception=None,
            context={},
        )


def weighted_tasks(stream_ratio: float) -> list[TaskSet | Callable[..., Any]]:
    """Locust's task list for a share ``stream_ratio`` of streamed requests (percent steps)."""
    streamed = round(stream_ratio * 100)
    whole = 100 - streamed
    unit = math.gcd(streamed, whole)
    tasks: list[TaskSet | Callable[..., Any]] = [ChatUser.chat_stream] * (streamed // unit)
    return tasks + [ChatUser.chat] * (whole // unit)
