"""A client that reads slower than its replica writes: the gateway holds the
replica back instead of buffering the stream, and loses nothing.

The replica here is a raw asyncio server in the test's loop, so the test sees
the one thing that proves back-pressure from the outside: the replica's own
transport is told to pause writing (its socket is full because the gateway
stopped reading) and stays paused, long before it has written the whole
stream. Without back-pressure the gateway would read on into its memory and
the replica would finish. The client is a raw socket that reads nothing, then
everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests.support import Gateway, pool_config

#: Far more than every buffer between the replica and the client can hold
#: (loopback socket buffers grow to a few MiB each; the gateway's are smaller).
TOTAL = 64 * 1024 * 1024
EVENT = b"data: " + b"x" * 1000 + b"\n\n"
EVENTS = TOTAL // len(EVENT)
DEADLINE_S = 20.0
#: How often the test looks at the replica while waiting for it to stand still.
POLL_S = 0.2


class Replica(asyncio.Protocol):
    """Answers /health with 200; any POST with EVENTS SSE events, chunked, as
    fast as the connection takes them."""

    def __init__(self, seen: Replica.Seen) -> None:
        self.seen = seen
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.can_write = asyncio.Event()
        self.can_write.set()

    class Seen:
        def __init__(self) -> None:
            self.paused = False
            self.written = 0
            self.streams: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def pause_writing(self) -> None:
        self.can_write.clear()
        self.seen.paused = True

    def resume_writing(self) -> None:
        self.can_write.set()
        self.seen.paused = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        self.buf = rest[length:]
        assert self.transport is not None
        if head.startswith(b"POST"):
            task = asyncio.create_task(self.stream())
            self.seen.streams.add(task)
            task.add_done_callback(self.seen.streams.discard)
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def stream(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
        for _ in range(EVENTS):
            await self.can_write.wait()
            if self.transport.is_closing():
                return
            self.transport.write(chunk)
            self.seen.written += len(EVENT)
        self.transport.write(b"0\r\n\r\n")


@contextlib.asynccontextmanager
async def replica() -> AsyncIterator[tuple[str, Replica.Seen]]:
    seen = Replica.Seen()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Replica(seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        for task in list(seen.streams):
            task.cancel()
        server.close()


async def test_slow_client_holds_the_replica_back_and_gets_every_byte(tmp_path: Path) -> None:
    async with replica() as (url, seen):
        cfg = pool_config(url)
        gw = await asyncio.to_thread(Gateway, tmp_path, cfg, "gw-backpressure")
        try:
            host, port = gw.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
            body = b'{"model": "m", "stream": true, "messages": []}'
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            # The client reads nothing: the replica must come to a stop, paused.
            async with asyncio.timeout(DEADLINE_S):
                before = -1
                while not (seen.paused and seen.written == before > 0):
                    before = seen.written
                    await asyncio.sleep(POLL_S)
            assert seen.written < TOTAL // 2, "the gateway swallowed the stream"

            # Now it reads everything: every event arrives, in one piece each.
            async with asyncio.timeout(DEADLINE_S):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                assert b"transfer-encoding: chunked" in head.lower()
                received = 0
                pending = b""
                while True:
                    size = int(await reader.readuntil(b"\r\n"), 16)
                    data = await reader.readexactly(size + 2)
                    assert data.endswith(b"\r\n")
                    if size == 0:
                        break
                    received += size
                    # Chunks need not end where events do; the bytes must match.
                    pending += data[:-2]
                    whole = len(pending) - len(pending) % len(EVENT)
                    assert pending[:whole] == EVENT * (whole // len(EVENT))
                    pending = pending[whole:]
            assert received == EVENTS * len(EVENT) == seen.written
            assert pending == b""
            writer.close()
        finally:
            await asyncio.to_thread(gw.stop)
