"""Bodies larger than one read, relayed through the splice: every byte
arrives, in the client's framing (Content-Length or chunked, as the replica
chose), and the client's keep-alive connection serves the next request.

The replica is an aiohttp server in the test's loop; the client is aiohttp's
own, held to one connection, so a response whose framing the gateway got
wrong would break the request after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import Gateway, pool_config

#: Far more than one read (the gateway reads up to 256 KiB at a time).
SIZE = 4 * 1024 * 1024
PIECE = 64 * 1024
BODY = hashlib.sha256(b"llmproxy").digest() * (SIZE // 32)
SHAPES = ("length", "chunked", "close")


async def big(request: web.Request) -> web.StreamResponse:
    await request.read()
    shape = request.headers["X-Shape"]
    if shape == "length":
        return web.Response(body=BODY, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    if shape == "chunked":
        resp.enable_chunked_encoding()
    else:  # the end of the body is the end of the connection (RFC 9112 §6.3)
        resp.force_close()
    await resp.prepare(request)
    for i in range(0, SIZE, PIECE):
        await resp.write(BODY[i : i + PIECE])
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@contextlib.asynccontextmanager
async def replica() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", big)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_large_bodies_arrive_whole_and_the_connection_is_reused(tmp_path: Path) -> None:
    async with replica() as url:
        gw = await asyncio.to_thread(Gateway, tmp_path, pool_config(url), "gw-bodies")
        try:
            opened = 0

            async def on_connect(*_: object) -> None:
                nonlocal opened
                opened += 1

            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(on_connect)
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
                for shape in SHAPES * 2:
                    async with session.post(
                        f"{gw.url}/v1/chat/completions",
                        json={"model": "m", "messages": []},
                        headers={"X-Shape": shape},
                    ) as resp:
                        assert resp.status == 200, shape
                        body = await resp.read()
                        assert len(body) == SIZE, shape
                        assert body == BODY, shape
                        if shape == "length":
                            assert resp.headers["Content-Length"] == str(SIZE)
                        else:
                            assert resp.headers.get("Transfer-Encoding") == "chunked", shape
            # The replica closing its connection is the replica's business:
            # the client's connection to the gateway lives on.
            assert opened == 1
        finally:
            await asyncio.to_thread(gw.stop)
