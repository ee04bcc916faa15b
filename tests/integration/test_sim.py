"""The simulated replica over real sockets: OpenAI SDK, TGI, faults, exact counters."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from llmproxy.sim import SimConfig, SimServer, sim_server

StartSim = Callable[..., Awaitable[SimServer]]


async def eventually(
    check: Callable[[], Awaitable[bool]], within_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds; fail after ``within_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start replicas (no delays unless asked) that stop at the end of the test."""
    async with AsyncExitStack() as stack:

        async def start(**fields: Any) -> SimServer:
            cfg = SimConfig(**({"ttft_ms": 0.0, "tokens_per_s": 0.0} | fields))
            return await stack.enter_async_context(sim_server(cfg))

        yield start


@pytest.fixture
async def sim(start_sim: StartSim) -> SimServer:
    return await start_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(sim: SimServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as c:
        yield c


async def stats(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    async with http.get(f"{sim.url}/sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def stat_is(http: aiohttp.ClientSession, sim: SimServer, **expected: int) -> bool:
    current = await stats(http, sim)
    return all(current[name] == value for name, value in expected.items())


async def set_faults(http: aiohttp.ClientSession, sim: SimServer, **faults: Any) -> None:
    async with http.post(f"{sim.url}/sim/faults", json=faults) as resp:
        assert resp.status == 200, await resp.text()


async def read_lines_into(resp: aiohttp.ClientResponse, sink: list[bytes]) -> None:
    """Keep what arrived even when the body ends in an error."""
    async for line in resp.content:
        sink.append(line)


def sse_payloads(raw: list[bytes]) -> list[str]:
    return [line[len(b"data: ") :].decode().strip() for line in raw if line.startswith(b"data:")]


CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "tell me about load balancers"}
]


# -- OpenAI API ---------------------------------------------------------------


async def test_chat_completion_is_deterministic_with_usage(client: AsyncOpenAI) -> None:
    first = await client.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=5)
    second = await client.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=5)
    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == second.choices[0].message.content
    assert len((first.choices[0].message.content or "").split()) == 5
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (5, 5)
    assert first.usage.total_tokens == 10


async def test_chat_stream_with_include_usage(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=4)
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=CHAT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(tokens) == 4
    assert "".join(t or "" for t in tokens) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_completions_default_length_ends_with_stop(client: AsyncOpenAI) -> None:
    whole = await client.completions.create(model="sim-model", prompt="once upon a time")
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "stop"
    assert len(whole.choices[0].text.split()) == 16
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == 4

    stream = await client.completions.create(
        model="sim-model", prompt="once upon a time", max_tokens=16, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


async def test_stream_ends_with_done(sim: SimServer, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "stream": True}
    async with http.post(f"{sim.url}/v1/completions", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        payloads = sse_payloads([line async for line in resp.content])
    assert payloads[-1] == "[DONE]"
    assert len(payloads) == 4  # two tokens, the final chunk, [DONE]


async def test_models_lists_the_served_model(start_sim: StartSim) -> None:
    sim = await start_sim(model="llama-sim")
    async with AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["llama-sim"]


async def test_unknown_model_is_404_like_vllm(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert caught.value.status_code == 404
    assert "The model `gpt-9` does not exist." in str(caught.value)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b'{"model": "sim-model"}'),
        ("/v1/completions", b'{"model": "sim-model", "prompt": 3}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}'),
        ("/v1/completions", b"[1, 2]"),
    ],
)
async def test_bad_requests_are_openai_shaped_400s(
    sim: SimServer, http: aiohttp.ClientSession, path: str, body: bytes
) -> None:
    async with http.post(f"{sim.url}{path}", data=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == 400
    assert error["type"] == "BadRequestError"
    assert error["message"]
    assert await stat_is(http, sim, requests=1, rejected=1)


# -- TGI API ------------------------------------------------------------------


async def test_tgi_generate_matches_generate_stream(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    body = {"inputs": "What is a GPU?", "parameters": {"max_new_tokens": 3, "details": True}}
    async with http.post(f"{sim.url}/generate", json=body) as resp:
        whole = await resp.json()
    assert whole["details"]["generated_tokens"] == 3
    assert whole["details"]["finish_reason"] == "length"

    async with http.post(f"{sim.url}/generate_stream", json=body) as resp:
        events = [json.loads(p) for p in sse_payloads([line async for line in resp.content])]
    assert len(events) == 3
    assert [e["generated_text"] for e in events[:-1]] == [None, None]
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]
    assert all(e["token"]["special"] is False for e in events)


async def test_tgi_validation_and_info(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sim.url}/generate", json={"inputs": ""}) as resp:
        assert resp.status == 422
        assert (await resp.json())["error_type"] == "validation"
    async with http.get(f"{sim.url}/info") as resp:
        assert (await resp.json())["model_id"] == "sim-model"


# -- health, metrics, control -------------------------------------------------


async def test_health_follows_the_unhealthy_fault(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{sim.url}/health") as resp:
        assert (resp.status, await resp.read()) == (200, b"")
    await set_faults(http, sim, unhealthy=True)
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 503
    async with http.delete(f"{sim.url}/sim/faults") as resp:
        assert (await resp.json())["unhealthy"] is False
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
    assert await stat_is(http, sim, health_checks=3, requests=0)


@pytest.mark.parametrize(
    "faults", [{"nope": 1}, {"error_rate": 2}, {"hang": "yes"}, {"error_status": 200}, [1]]
)
async def test_invalid_faults_are_rejected_whole(
    sim: SimServer, http: aiohttp.ClientSession, faults: object
) -> None:
    before = await (await http.get(f"{sim.url}/sim/faults")).json()
    async with http.post(f"{sim.url}/sim/faults", json=faults) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"]
    after = await (await http.get(f"{sim.url}/sim/faults")).json()
    assert after == before


async def test_error_rate_one_injects_the_configured_status(
    sim: SimServer, http: aiohttp.ClientSession, client: AsyncOpenAI
) -> None:
    await set_faults(http, sim, error_rate=1, error_status=503)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="sim-model", messages=CHAT)
    assert caught.value.status_code == 503
    async with http.post(f"{sim.url}/generate", json={"inputs": "x"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error_type"] == "generation"
    assert await stat_is(http, sim, requests=2, errors_injected=2, completed=0)


async def test_seeded_error_injection_is_reproducible(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    async def pattern(sim: SimServer) -> list[int]:
        statuses = []
        for _ in range(30):
            async with http.post(f"{sim.url}/v1/completions", json={"prompt": "x"}) as resp:
                statuses.append(resp.status)
        return statuses

    first = await pattern(await start_sim(error_rate=0.5, seed=7))
    second = await pattern(await start_sim(error_rate=0.5, seed=7))
    assert first == second
    assert set(first) == {200, 500}


async def test_metrics_use_vllm_names(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sim.url}/v1/completions", json={"prompt": "a b", "max_tokens": 3}):
        pass
    async with http.get(f"{sim.url}/metrics") as resp:
        text = await resp.text()
    label = '{model_name="sim-model"}'
    assert f"vllm:num_requests_running{label} 0.0" in text
    assert f"vllm:num_requests_waiting{label} 0.0" in text
    assert f"vllm:kv_cache_usage_perc{label} 0.0" in text
    assert f"vllm:generation_tokens_total{label} 3.0" in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="sim-model"} 1.0' in text


async def test_stats_record_headers_and_reset(sim: SimServer, http: aiohttp.ClientSession) -> None:
    headers = {"X-Request-Id": "abc-123", "Authorization": "Bearer k"}
    async with http.post(f"{sim.url}/v1/completions", json={"prompt": "x"}, headers=headers):
        pass
    current = await stats(http, sim)
    assert current["last_headers"]["x-request-id"] == "abc-123"
    assert current["last_headers"]["authorization"] == "Bearer k"
    assert (current["requests"], current["completed"]) == (1, 1)
    async with http.post(f"{sim.url}/sim/reset") as resp:
        assert resp.status == 200
    assert await stats(http, sim) | {"last_headers": None} == {
        "requests": 0,
        "completed": 0,
        "cancelled": 0,
        "cut": 0,
        "errors_injected": 0,
        "rejected": 0,
        "running": 0,
        "waiting": 0,
        "hanging": 0,
        "health_checks": 0,
        "last_headers": None,
    }


# -- hangs, cuts, disconnects, queueing ---------------------------------------


async def test_hang_times_the_client_out_and_counts_a_cancellation(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    await set_faults(http, sim, hang=True)
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{sim.url}/v1/completions", json={"prompt": "x"}, timeout=timeout):
            pass
    await eventually(lambda: stat_is(http, sim, cancelled=1, hanging=0), what="cancelled=1")
    assert await stat_is(http, sim, requests=1, completed=0)


@pytest.mark.parametrize("stream", [True, False])
async def test_cut_after_tokens_truncates_the_response(
    sim: SimServer, http: aiohttp.ClientSession, stream: bool
) -> None:
    await set_faults(http, sim, cut_after_tokens=3)
    body = {"messages": CHAT, "max_tokens": 10, "stream": stream}
    received: list[bytes] = []
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_lines_into(resp, received)
    if stream:
        payloads = sse_payloads(received)
        assert len(payloads) == 4  # the role chunk, then three tokens
        assert "[DONE]" not in payloads
    assert await stat_is(http, sim, requests=1, cut=1, completed=0)


async def test_cut_stream_seen_by_the_openai_sdk(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    await set_faults(http, sim, cut_after_tokens=2)
    async with AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        stream = await client.completions.create(
            model="sim-model", prompt="x", max_tokens=5, stream=True
        )
        texts: list[str] = []

        async def collect() -> None:
            async for chunk in stream:
                texts.append(chunk.choices[0].text)

        with pytest.raises(openai.APIConnectionError):
            await collect()
    assert len(texts) == 2


async def test_client_disconnect_mid_stream_is_counted(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    sim = await start_sim(tokens_per_s=50)
    body = {"prompt": "x", "max_tokens": 1000, "stream": True}
    resp = await http.post(f"{sim.url}/v1/completions", json=body)
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    resp.close()  # drops the connection
    await eventually(lambda: stat_is(http, sim, cancelled=1, running=0), what="cancelled=1")
    assert await stat_is(http, sim, requests=1, completed=0, cut=0)


async def test_max_concurrency_queues_in_order(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    # Slow enough that the first request holds the only slot until we speed it up.
    sim = await start_sim(max_concurrency=1, tokens_per_s=5)
    body = {"prompt": "x", "max_tokens": 50}
    url = f"{sim.url}/v1/completions"

    async def complete() -> str:
        async with http.post(url, json=body) as resp:
            assert resp.status == 200
            return str((await resp.json())["choices"][0]["text"])

    async def metric(name: str) -> float:
        async with http.get(f"{sim.url}/metrics") as resp:
            text = await resp.text()
        line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    async def metrics_show_one_waiting() -> bool:
        waiting = await metric("vllm:num_requests_waiting")
        return waiting == 1 and await metric("vllm:num_requests_running") == 1

    body["stream"] = True
    first = await http.post(url, json=body)  # streaming: headers come before the slot
    del body["stream"]
    await eventually(lambda: stat_is(http, sim, running=1), what="first request running")
    second = asyncio.create_task(complete())
    await eventually(metrics_show_one_waiting, what="one waiting on /metrics")
    assert await metric("vllm:kv_cache_usage_perc") == 1.0

    await set_faults(http, sim, tokens_per_s=0)  # the next token gap is 0
    payloads = sse_payloads([line async for line in first.content])
    first.release()
    assert payloads[-1] == "[DONE]"
    assert len((await second).split()) == 50
    assert await stat_is(http, sim, requests=2, completed=2, running=0, waiting=0)


async def test_cancelled_while_waiting_leaves_the_queue(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    sim = await start_sim(max_concurrency=1, hang=False, ttft_ms=60_000)
    url = f"{sim.url}/v1/completions"
    holder = asyncio.create_task(http.post(url, json={"prompt": "a"}))
    await eventually(lambda: stat_is(http, sim, running=1), what="one running")
    waiter = asyncio.create_task(http.post(url, json={"prompt": "b"}))
    await eventually(lambda: stat_is(http, sim, waiting=1), what="one waiting")
    waiter.cancel()
    await eventually(lambda: stat_is(http, sim, waiting=0, cancelled=1), what="queue emptied")
    holder.cancel()
    await eventually(lambda: stat_is(http, sim, running=0, cancelled=2), what="all cancelled")


# -- as a separate process ----------------------------------------------------


async def test_subprocess_serves_and_exits_cleanly_on_sigterm(
    http: aiohttp.ClientSession,
) -> None:
    args = ["--port", "0", "--model", "proc-model", "--ttft-ms", "0", "--unhealthy"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmproxy.sim",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
        assert line.startswith("sim listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with http.get(f"{url}/health") as resp:
            assert resp.status == 503
        body = {"model": "proc-model", "prompt": "x", "max_tokens": 2}
        async with http.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    assert await proc.stderr.read() == b""
