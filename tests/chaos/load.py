"""A bounded load generator for the chaos suite.

``Load`` runs N concurrent clients in a background thread with its own event
loop, so the test body stays synchronous: it kills, hangs and signals real
processes and polls state with ``wait_for`` while the clients keep going.
Each client loops (closed loop: one request at a time) until the load is
stopped, and every request leaves a :class:`Record` of what a user would
have seen on the wire.

Two client implementations, same records:
- ``"openai"``: the official SDK (``AsyncOpenAI``, no SDK retries), as users
  call the gateway; an SSE error event surfaces as the SDK's ``APIError``.
- ``"aiohttp"``: raw HTTP and SSE parsing, for scenarios that look at the
  exact wire (``[DONE]``, ``Retry-After``, the JSON error body).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "tell me about the fox"}]

#: A worker's request shape: (stream?, max_tokens), chosen by worker index.
Shape = Callable[[int], tuple[bool, int]]


def mixed(stream_tokens: int = 30, whole_tokens: int = 10) -> Shape:
    """Even workers stream, odd ones do not: a fixed 50/50 mix."""
    return lambda worker: (worker % 2 == 0, stream_tokens if worker % 2 == 0 else whole_tokens)


@dataclass(slots=True)
class Record:
    """One request as the client saw it. Times are ``time.monotonic()``."""

    worker: int
    stream: bool
    max_tokens: int
    started: float
    #: When the first body byte (streams: the first SSE event) arrived.
    first_byte: float | None = None
    ended: float = 0.0
    #: ``ok`` | ``http`` (an error status) | ``sse_error`` (a final SSE error
    #: event) | ``truncated`` (ended without [DONE] / all tokens, no error
    #: event) | ``exception`` (transport error, timeout, bad body).
    outcome: str = ""
    status: int | None = None
    backend: str | None = None
    attempts: int | None = None
    tokens: int = 0
    done: bool = False
    retry_after: str | None = None
    #: The JSON error body, SSE error payload or exception text.
    error: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def in_flight_at(self, t: float) -> bool:
        return self.started < t < self.ended

    def brief(self, t0: float = 0.0) -> str:
        kind = "stream" if self.stream else "whole"
        fb = f"{self.first_byte - t0:.3f}" if self.first_byte is not None else "-"
        return (
            f"<{kind} w{self.worker} {self.outcome} status={self.status} backend={self.backend}"
            f" attempts={self.attempts} tokens={self.tokens}/{self.max_tokens} done={self.done}"
            f" t={self.started - t0:.3f}..{self.ended - t0:.3f} first_byte={fb}"
            f" error={str(self.error)[:200]!r}>"
        )


def summary(records: Iterable[Record], t0: float = 0.0, show: int = 12) -> str:
    """Counts by kind and outcome, per backend, and the first failures in full."""
    records = list(records)
    counts = Counter(("stream" if r.stream else "whole", r.outcome, r.status) for r in records)
    backends = Counter(r.backend for r in records)
    bad = [r for r in records if not r.ok]
    lines = [f"{len(records)} requests; outcomes {dict(counts)}; backends {dict(backends)}"]
    lines += [r.brief(t0) for r in bad[:show]]
    if len(bad) > show:
        lines.append(f"... and {len(bad) - show} more failures")
    return "\n".join(lines)


class Load:
    """``clients`` concurrent closed-loop clients against ``url``, in a thread.

    Use as a context manager; ``window(s)`` lets the load run for a fixed
    time (bounded load, not a wait for a condition); ``stop()`` lets each
    client finish its current request and returns every record.
    """

    def __init__(
        self,
        url: str,
        *,
        clients: int = 16,
        client: str = "openai",
        shape: Shape | None = None,
        timeout_s: float = 15.0,
        pause_s: float = 0.005,
        error_pause_s: float = 0.05,
    ) -> None:
        assert client in ("openai", "aiohttp"), client
        self.url = url
        self.clients = clients
        self.client = client
        self.shape = shape or mixed()
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.error_pause_s = error_pause_s
        self.records: list[Record] = []
        self._issuing = True
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self._started = threading.Event()
        self._crash: BaseException | None = None

    # -- control, from the test thread ------------------------------------
    def __enter__(self) -> Load:
        self._thread.start()
        assert self._started.wait(10), "load generator did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def window(self, seconds: float) -> None:
        """Keep the load running for a fixed time."""
        time.sleep(seconds)

    def stop_issuing(self) -> None:
        """No client starts a new request; those in flight go on."""
        self._issuing = False

    def stop(self) -> list[Record]:
        self._issuing = False
        self._thread.join(self.timeout_s + 10)
        assert not self._thread.is_alive(), "load generator did not stop"
        if self._crash is not None:
            raise self._crash
        return self.records

    def since(self, t: float) -> list[Record]:
        """Records of requests started at or after ``t`` (a snapshot)."""
        return [r for r in list(self.records) if r.started >= t]

    # -- the event loop thread --------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed to the test thread in stop()
            self._crash = exc
            self._started.set()

    async def _main(self) -> None:
        if self.client == "openai":
            sdk = openai.AsyncOpenAI(
                base_url=f"{self.url}/v1",
                api_key="sk-chaos",
                max_retries=0,
                timeout=self.timeout_s,
            )
            async with sdk:
                self._started.set()
                await asyncio.gather(
                    *(
                        self._worker(i, lambda r, s=sdk: _openai_call(s, r))
                        for i in range(self.clients)
                    )
                )
        else:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                self._started.set()
                await asyncio.gather(
                    *(
                        self._worker(i, lambda r, s=session: _aiohttp_call(s, self.url, r))
                        for i in range(self.clients)
                    )
                )

    async def _worker(self, worker: int, call: Callable[[Record], Any]) -> None:
        while self._issuing:
            stream, max_tokens = self.shape(worker)
            record = Record(worker, stream, max_tokens, started=time.monotonic())
            self.records.append(record)
            try:
                await call(record)
            except Exception as exc:  # the client's view of any failure
                record.outcome = "exception"
                record.error = f"{type(exc).__name__}: {exc}"
            finally:
                record.ended = time.monotonic()
            await asyncio.sleep(self.pause_s if record.ok else self.error_pause_s)


def _take_headers(record: Record, headers: Any) -> None:
    record.headers = {k.lower(): v for k, v in headers.items()}
    record.backend = record.headers.get("x-llmproxy-backend")
    attempts = record.headers.get("x-llmproxy-attempts")
    record.attempts = int(attempts) if attempts and attempts.isdigit() else None
    record.retry_after = record.headers.get("retry-after")


async def _openai_call(client: openai.AsyncOpenAI, record: Record) -> None:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=record.max_tokens,
            stream=record.stream,
        )
    except openai.APIStatusError as exc:
        record.status = exc.status_code
        _take_headers(record, exc.response.headers)
        record.outcome = "http"
        try:
            record.error = exc.response.json()
        except ValueError:
            record.error = exc.response.text
        return
    record.status = raw.status_code
    _take_headers(record, raw.headers)
    if not record.stream:
        completion = raw.parse()
        record.first_byte = time.monotonic()
        usage = completion.usage
        record.tokens = usage.completion_tokens if usage else 0
        record.done = bool(completion.choices and completion.choices[0].message.content)
        record.outcome = "ok" if record.done and record.tokens == record.max_tokens else "truncated"
        return
    finish = None
    try:
        async for chunk in raw.parse():
            if record.first_byte is None:
                record.first_byte = time.monotonic()
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta.content:
                    record.tokens += 1
                finish = choice.finish_reason or finish
    except openai.APIError as exc:
        if isinstance(exc, openai.APIConnectionError | openai.APIStatusError):
            raise
        # The SDK raises a plain APIError for a `data: {"error": ...}` event.
        record.outcome = "sse_error"
        record.error = exc.body
        return
    # The SDK stops at [DONE] without saying so: a finish reason and every
    # token are what an intact stream has.
    record.done = finish is not None
    record.outcome = "ok" if record.done and record.tokens == record.max_tokens else "truncated"


async def _aiohttp_call(session: aiohttp.ClientSession, url: str, record: Record) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": record.max_tokens,
        "stream": record.stream,
    }
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        record.status = resp.status
        _take_headers(record, resp.headers)
        if resp.status != 200:
            raw = await resp.read()
            record.outcome = "http"
            try:
                record.error = json.loads(raw)
            except ValueError:
                record.error = raw[:500]
            return
        if not record.stream:
            data = json.loads(await resp.read())
            record.first_byte = time.monotonic()
            record.tokens = data["usage"]["completion_tokens"]
            record.done = bool(data["choices"][0]["message"]["content"])
            ok = record.done and record.tokens == record.max_tokens
            record.outcome = "ok" if ok else "truncated"
            return
        buffer = b""
        async for chunk in resp.content.iter_any():
            if record.first_byte is None:
                record.first_byte = time.monotonic()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if _sse_event(record, event.decode()):
                    return
        record.outcome = "ok" if record.done and record.tokens == record.max_tokens else "truncated"


def _sse_event(record: Record, event: str) -> bool:
    """Account one SSE event; True when the stream is over for the client."""
    data = "".join(
        line.removeprefix("data:").strip()
        for line in event.splitlines()
        if line.startswith("data:")
    )
    if not data:
        return False
    if data == "[DONE]":
        record.done = True
        return False  # anything after [DONE] would be a protocol error; read to EOF
    payload = json.loads(data)
    if "error" in payload:
        record.outcome = "sse_error"
        record.error = payload["error"]
        return True
    for choice in payload.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            record.tokens += 1
    return False
