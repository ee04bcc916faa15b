"""``llmproxy demo``: three simulated replicas of different speeds and a gateway.

Everything runs in this one process and event loop, so Ctrl-C stops it all.
The gateway's config goes through the same loader and validation as a file.
"""

from __future__ import annotations

import asyncio
import json
import os

from aiohttp import web

from llmproxy import sim
from llmproxy.app import Listening, serve
from llmproxy.config import parse_config

#: (name, time to first token in ms, tokens per second): a fast, a medium and
#: a slow GPU, so the balancer has something to balance.
REPLICAS = (("fast", 40.0, 80.0), ("medium", 120.0, 40.0), ("slow", 300.0, 15.0))
MODEL = "demo-model"


async def _start_replica(host: str, ttft_ms: float, tokens_per_s: float) -> web.AppRunner:
    cfg = sim.SimConfig(host=host, port=0, model=MODEL, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s)
    runner = web.AppRunner(sim.build_app(cfg), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner


def _instructions(where: Listening) -> str:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 20,
            "stream": True,
        }
    )
    return f"""
llmproxy demo is running.
  gateway: {where.url}      admin: {where.admin_url} (try {where.admin_url}/admin/state)

Try it with curl:
  curl -N {where.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'

or with the openai SDK (pip install openai):
  python -c 'from openai import OpenAI
c = OpenAI(base_url="{where.url}/v1", api_key="unused")
for ev in c.chat.completions.create(model="{MODEL}", max_tokens=20, stream=True,
        messages=[{{"role": "user", "content": "Say hello"}}]):
    print(ev.choices[0].delta.content or "", end="", flush=True) if ev.choices else None
print()'

Press Ctrl-C to stop.
""".rstrip()


async def run_demo(*, host: str = "127.0.0.1", port: int = 8080, admin_port: int = 8081) -> None:
    runners = [await _start_replica(host, t, s) for _, t, s in REPLICAS]
    try:
        backends = []
        for (name, _, _), r in zip(REPLICAS, runners, strict=True):
            h, p = r.addresses[0][:2]
            backends.append({"url": f"http://{h}:{p}", "name": name})
        raw = {
            "server": {"host": host, "port": port, "drain_timeout_s": 2},
            "admin": {"host": host, "port": admin_port},
            "pools": {
                "demo": {
                    "balancer": "least_connections",
                    "backends": backends,
                    "health": {"interval_s": 1, "timeout_s": 0.5},
                    "timeouts": {"connect_s": 1, "first_byte_s": 10, "idle_s": 10},
                }
            },
            "routes": [{"name": "all", "match": {"model": "*"}, "pool": "demo"}],
        }
        config = parse_config(raw, os.environ, source="demo")
        await serve(config, on_listening=lambda where: print(_instructions(where), flush=True))
    finally:
        await asyncio.gather(*(r.cleanup() for r in runners))
