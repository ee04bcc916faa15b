"""A canned, fast upstream: answers every request with a fixed chat completion.

``python -m bench_lib.fast_upstream --port 0`` prints
``fast upstream listening on http://127.0.0.1:PORT``.

Why not the simulated replica for the throughput test: it is an aiohttp app
that parses JSON and renders a completion per request; sharing core 1 with
wrk it tops out around 8,000 req/s, so it would cap the proxies (nginx most
of all) rather than measure them. This server is a bare ``asyncio.Protocol``
on uvloop that sends a response of the same shape and size as the simulated
replica's (the same headers, a 300-byte JSON body), so the proxy under test
does exactly the same work per request; only the upstream's own cost shrinks.

HTTP/1.1 keep-alive, pipelining, ``Content-Length`` request bodies only
(what aiohttp's client, nginx and wrk send here). Standard library + uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import signal
import time
from typing import cast

from bench_lib.loop import run

BODY = json.dumps(
    {
        "id": "chatcmpl-0123456789abcdef0123456789abcdef",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "sim-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "serves"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    },
    separators=(",", ":"),
).encode()
HEALTH_BODY = b'{"status":"ok"}'
MAX_HEADER = 65536


class _Clock:
    """The ``Date`` header, formatted once a second rather than per response."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


def _response(clock: _Clock, body: bytes, status: bytes = b"200 OK") -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 ", status, b"\r\n",
            b"Content-Type: application/json\r\n",
            b"Content-Length: ", str(len(body)).encode(), b"\r\n",
            b"Date: ", clock.date(), b"\r\n",
            b"Server: bench-fast-upstream\r\n\r\n",
            body,
        )
    )  # fmt: skip


class Upstream(asyncio.Protocol):
    def __init__(self, clock: _Clock) -> None:
        self._clock = clock
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            length = 0
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                break
            body = HEALTH_BODY if head.startswith((b"get /health", b"get /v1/models")) else BODY
            out.append(_response(self._clock, body))
            buf = buf[end + 4 + length :]
            if b"\r\nconnection: close" in head:
                close = True
                break
        self._buf = buf
        t = self._transport
        assert t is not None
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])
        if close or len(buf) > MAX_HEADER:
            t.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    clock = _Clock()
    server = await loop.create_server(lambda: Upstream(clock), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"fast upstream listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    ns = p.parse_args()
    run(serve(ns.host, ns.port))


if __name__ == "__main__":
    main()
