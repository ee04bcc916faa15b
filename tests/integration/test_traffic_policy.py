"""Traffic policy end to end, on a real gateway process in front of simulated
replicas: rate limits (requests and tokens, with the headers OpenAI clients
read), the weighted canary split and its automatic rollback, client API keys
and the pool override, and the admin API's token.

Where a client's view matters (errors, headers, stream chunks) the client is
the openai SDK (``max_retries=0``, so what it sees is what the gateway sent);
bulk traffic for the split and canary tests goes through aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.policy.auth import hash_key
from tests.support import Gateway, Proc, Sim, http, pool_config, wait_for

MODEL = "sim-model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
BODY = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
ADMIN_TOKEN = "admin-secret-token"
#: Sims that answer at once: these tests are about policy, not timing.
FAST = ("--ttft-ms", "0", "--tokens-per-s", "0")
NO_HEALTH = {"enabled": False}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts; stopped (gateways first) when it ends."""
    started: list[Proc] = []
    yield started
    for p in sorted(started, key=lambda p: not isinstance(p, Gateway)):
        p.stop()


def start_sim(procs: list[Proc], tmp: Path, *args: str, name: str) -> Sim:
    sim = Sim(tmp, *FAST, *args, name=name)
    procs.append(sim)
    return sim


def start_gateway(
    procs: list[Proc], tmp: Path, config: dict[str, Any], name: str = "gw"
) -> Gateway:
    gw = Gateway(tmp, config, name=name)
    procs.append(gw)
    return gw


def client(gw: Gateway, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=10)


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """The value of one sample of ``gw``'s metrics (0 if absent)."""
    for family in text_string_to_metric_families(gw.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def sim_tokens(sim: Sim) -> float:
    """Prompt plus generated tokens the replica has produced (its vLLM counters)."""
    total = 0.0
    text = http("GET", f"{sim.url}/metrics")[2].decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                total += s.value
    return total


def two_pools(stable: Sim, canary: Sim, /, **route: Any) -> dict[str, Any]:
    pool = {"health": NO_HEALTH, "outlier": {"enabled": False}}
    return {
        "pools": {
            "stable": {"backends": [{"url": stable.url}], **pool},
            "canary": {"backends": [{"url": canary.url}], **pool},
        },
        "routes": [
            {
                "name": "chat",
                "match": {"model": "*"},
                "split": [{"pool": "stable", "weight": 90}, {"pool": "canary", "weight": 10}],
                **route,
            }
        ],
    }


async def post_many(
    url: str, headers_each: list[dict[str, str]], concurrency: int = 32
) -> list[tuple[int, str]]:
    """POST BODY once per header dict, ``concurrency`` at a time; (status, pool) each."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=10)

    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def one(headers: dict[str, str]) -> tuple[int, str]:
            async with sem, s.post(f"{url}/v1/chat/completions", json=BODY, headers=headers) as r:
                await r.read()
                return r.status, r.headers.get("x-llmproxy-pool", "")

        return await asyncio.gather(*(one(h) for h in headers_each))


# -- rate limits ---------------------------------------------------------------------------


def test_requests_per_minute_admits_exactly_the_limit_then_429(
    tmp_path: Path, procs: list[Proc]
) -> None:
    sim = start_sim(procs, tmp_path, name="sim")
    cfg = pool_config(sim.url, health=NO_HEALTH)
    cfg["rate_limits"] = {"rules": [{"key": "api_key", "requests_per_minute": 5}]}
    gw = start_gateway(procs, tmp_path, cfg)
    alice = client(gw, "sk-alice")
    remaining = []
    for _ in range(5):
        raw = alice.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=1
        )
        assert raw.status_code == 200
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [4, 3, 2, 1, 0]

    with pytest.raises(openai.RateLimitError) as caught:
        alice.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    err = caught.value
    assert err.status_code == 429
    h = err.response.headers
    # One request refills every 12 s: the hint says to come back in about that.
    assert 1 <= int(h["retry-after"]) <= 12
    assert 0 < int(h["retry-after-ms"]) <= 12_000
    assert h["x-ratelimit-limit-requests"] == "5"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    body = err.response.json()["error"]
    assert body["type"] == "rate_limit_error"
    assert body["code"] == "rate_limit_exceeded"
    assert isinstance(body["message"], str)

    assert sim.stats()["requests"] == 5  # the refused request never reached the replica
    # Another key has its own bucket.
    assert (
        client(gw, "sk-bob")
        .chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        .choices
    )
    assert metric(gw, "llmproxy_ratelimited_total", rule="api_key:requests") == 1


async def test_token_budget_is_precharged_so_long_generations_cannot_overshoot(
    tmp_path: Path, procs: list[Proc]
) -> None:
    # 200 tokens at 400/s: each generation lasts 0.5 s, so all ten overlap. A
    # limiter that charged tokens only when a response ended would let all ten
    # (about 2,000 tokens) through a 1,000-token budget.
    sim = start_sim(procs, tmp_path, "--tokens-per-s", "400", name="sim")
    budget, max_tokens = 1000, 200
    cfg = pool_config(sim.url, health=NO_HEALTH)
    cfg["rate_limits"] = {"rules": [{"key": "api_key", "tokens_per_minute": budget}]}
    gw = start_gateway(procs, tmp_path, cfg)
    # The gateway's pre-charge: prompt estimate (JSON chars / 4) + max_tokens.
    precharge = len(json.dumps(MESSAGES)) // 4 + max_tokens
    sdk = openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key="sk-tokens", max_retries=0, timeout=10
    )

    async def one(stream: bool) -> str:
        try:
            if stream:  # no stream_options: the gateway asks for usage itself
                chunks = await sdk.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=max_tokens, stream=True
                )
                async for chunk in chunks:
                    assert chunk.choices
                return "ok"
            await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens)
            return "ok"
        except openai.RateLimitError as exc:
            # The refusal names the budget it applies.
            return f"429 of {exc.response.headers['x-ratelimit-limit-tokens']}"

    t0 = time.monotonic()
    outcomes = await asyncio.gather(*(one(stream=i % 2 == 0) for i in range(10)))
    elapsed = time.monotonic() - t0
    await sdk.close()

    # A full bucket holds budget // precharge requests; refill (1000/60 a
    # second) lets one more in only after a few seconds: that is the slack.
    admitted = outcomes.count("ok")
    assert budget // precharge <= admitted <= int(budget * (1 + elapsed / 60)) // precharge
    assert Counter(outcomes) == {"ok": admitted, f"429 of {budget}": 10 - admitted}
    produced = sim_tokens(sim)
    assert produced == admitted * (max_tokens + 1)  # "hi" is one prompt token
    # The guarantee: within W seconds at most budget·(1 + W/60) plus one
    # request's pre-charge.
    assert produced <= budget * (1 + elapsed / 60) + precharge
    assert metric(gw, "llmproxy_ratelimited_total", rule="api_key:tokens") == 10 - admitted


def test_stream_without_usage_is_settled_and_the_client_never_sees_usage(
    tmp_path: Path, procs: list[Proc]
) -> None:
    sim = start_sim(procs, tmp_path, name="sim")  # 16 tokens when max_tokens is unset
    budget = 3000  # refills 50 tokens/s: slow enough to tell a refund from refill
    cfg = pool_config(sim.url, health=NO_HEALTH)
    cfg["rate_limits"] = {"rules": [{"key": "api_key", "tokens_per_minute": budget}]}
    gw = start_gateway(procs, tmp_path, cfg)
    sdk = client(gw, "sk-stream")

    def remaining_tokens() -> int:
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=1
        )
        return int(raw.headers["x-ratelimit-remaining-tokens"])

    # No max_tokens: 1024 tokens are pre-charged; the replica makes 16 + 1.
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert chunks, "no chunks"
    assert all(c.choices for c in chunks)  # the usage-only chunk was hidden
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 16
    # Settlement refunds the unused pre-charge: the bucket is nearly full
    # again at once, where refill alone would take 20 s.
    wait_for(lambda: remaining_tokens() > budget - 200, timeout=5, what="stream settled")
    assert metric(gw, "llmproxy_tokens_total", route="all", kind="completion") >= 16

    # A client that asks for usage still gets it.
    asked = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].usage is not None
    assert asked[-1].usage.completion_tokens == 3
    assert asked[-1].choices == []


# -- weighted canary ---------------------------------------------------------------------


async def test_canary_split_is_90_10_and_sticky_users_never_switch(
    tmp_path: Path, procs: list[Proc]
) -> None:
    stable = start_sim(procs, tmp_path, name="stable")
    canary = start_sim(procs, tmp_path, name="canary")
    gw = start_gateway(procs, tmp_path, two_pools(stable, canary, sticky="header:x-user-id"))

    results = await post_many(gw.url, [{"x-user-id": f"user-{i}"} for i in range(2000)])
    assert all(status == 200 for status, _ in results)
    counts = Counter(pool for _, pool in results)
    assert set(counts) == {"stable", "canary"}
    assert abs(counts["canary"] / 2000 - 0.10) <= 0.03, counts
    assert canary.stats()["requests"] == counts["canary"]
    first_pool = {f"user-{i}": pool for i, (_, pool) in enumerate(results)}

    # 100 of those users, 10 requests each, interleaved: each keeps its pool.
    users = [f"user-{i}" for i in range(100)] * 10
    again = await post_many(gw.url, [{"x-user-id": u} for u in users])
    seen: dict[str, set[str]] = {}
    for user, (status, pool) in zip(users, again, strict=True):
        assert status == 200
        seen.setdefault(user, set()).add(pool)
    assert all(pools == {first_pool[u]} for u, pools in seen.items()), seen

    # Raising the canary (listed last) moves stable users onto it, never back.
    st, _, _ = http(
        "POST",
        f"{gw.admin_url}/admin/routes/chat/weights",
        {"weights": {"stable": 80, "canary": 20}},
    )
    assert st == 200
    later = await post_many(gw.url, [{"x-user-id": f"user-{i}"} for i in range(2000)])
    moved = Counter((first_pool[f"user-{i}"], pool) for i, (_, pool) in enumerate(later))
    assert moved[("canary", "stable")] == 0
    assert moved[("canary", "canary")] == counts["canary"]
    assert abs((moved[("stable", "canary")] + counts["canary"]) / 2000 - 0.20) <= 0.03


async def test_runtime_weight_change_applies_to_the_next_request(
    tmp_path: Path, procs: list[Proc]
) -> None:
    stable = start_sim(procs, tmp_path, name="stable")
    canary = start_sim(procs, tmp_path, name="canary")
    gw = start_gateway(procs, tmp_path, two_pools(stable, canary, sticky="none"))
    url = f"{gw.admin_url}/admin/routes/chat/weights"

    for weights, only in (({"stable": 0, "canary": 100}, "canary"), ({"stable": 100}, "stable")):
        st, _, body = http("POST", url, {"weights": weights})
        assert st == 200, body
        results = await post_many(gw.url, [{}] * 50)
        assert Counter(results) == {(200, only): 50}
        route = gw.state()["routes"][0]
        assert route["weights_overridden"] is True
        assert {t["pool"]: t["weight"] for t in route["split"]}[only] == 100
    assert metric(gw, "llmproxy_canary_weight", route="chat", pool="canary") == 0

    # Weights that cannot apply are refused and change nothing.
    assert http("POST", url, {"weights": {"stable": 0}})[0] == 400
    assert http("POST", url, {"weights": {"nope": 1}})[0] == 400
    assert http("POST", url, {"weights": {"stable": -1}})[0] == 400
    # Python's json accepts NaN and Infinity; neither is a weight.
    for odd in (float("nan"), float("inf"), True):
        assert http("POST", url, {"weights": {"stable": odd, "canary": 1}})[0] == 400, odd
    assert http("POST", url, {"oops": 1})[0] == 400
    assert http("POST", f"{gw.admin_url}/admin/routes/nope/weights", {"weights": {}})[0] == 404
    assert Counter(await post_many(gw.url, [{}] * 10)) == {(200, "stable"): 10}


async def test_failing_canary_is_rolled_back_without_client_errors(
    tmp_path: Path, procs: list[Proc]
) -> None:
    stable = start_sim(procs, tmp_path, name="stable")
    # 503 is retryable: a failed canary attempt (before the commit point)
    # is retried on the stable pool, invisibly to the client.
    canary = start_sim(
        procs, tmp_path, "--error-rate", "0.3", "--error-status", "503", "--seed", "7",
        name="canary",
    )  # fmt: skip
    window_s = 5.0
    cfg = two_pools(
        stable,
        canary,
        sticky="none",
        canary={
            "canary_pool": "canary",
            "stable_pool": "stable",
            "window_s": window_s,
            "min_samples": 20,
            "max_error_rate_increase": 0.1,
        },
    )
    # Default retry settings: a failed canary attempt moves on to the stable
    # pool (never the same canary replica while stable has an untried one),
    # and the stable pool's budget pays for it. The breaker stays out of the
    # way: it is the canary analysis that must take the canary out.
    cfg["pools"]["canary"]["breaker"] = {"failure_threshold": 1000}
    gw = start_gateway(procs, tmp_path, cfg)
    assert gw.state()["routes"][0]["canary"]["weight"] == 10

    statuses: Counter[int] = Counter()
    t0 = time.monotonic()
    rolled_back_after = None
    while time.monotonic() - t0 < window_s + 5:
        statuses.update(s for s, _ in await post_many(gw.url, [{}] * 50))
        if gw.state()["routes"][0]["canary"]["state"] == "rolled_back":
            rolled_back_after = time.monotonic() - t0
            break
    assert rolled_back_after is not None, gw.state()["routes"][0]["canary"]
    assert rolled_back_after <= window_s
    assert statuses.keys() == {200}, statuses  # no client saw a canary failure
    assert canary.stats()["errors_injected"] > 0

    route = gw.state()["routes"][0]
    assert route["canary"]["weight"] == 0
    assert "error rate" in route["canary"]["reason"]
    assert {t["pool"]: t["weight"] for t in route["split"]} == {"stable": 100, "canary": 0}
    assert metric(gw, "llmproxy_canary_rollbacks_total", route="chat") == 1
    assert metric(gw, "llmproxy_canary_weight", route="chat", pool="canary") == 0

    served = canary.stats()["requests"]
    after = await post_many(gw.url, [{}] * 200)
    assert Counter(after) == {(200, "stable"): 200}
    assert canary.stats()["requests"] == served
    # It stays rolled back (analysis keeps running every 0.5 s).
    assert gw.state()["routes"][0]["canary"]["state"] == "rolled_back"


# -- API keys and the pool override --------------------------------------------------------


def test_api_keys_and_the_pool_override(tmp_path: Path, procs: list[Proc]) -> None:
    stable = start_sim(procs, tmp_path, name="stable")
    canary = start_sim(procs, tmp_path, name="canary")
    cfg = two_pools(stable, canary)
    cfg["routes"] = [{"name": "chat", "match": {"model": "*"}, "pool": "stable"}]
    cfg["pools"]["stable"]["api_key"] = "backend-secret"  # vLLM --api-key of that pool
    cfg["auth"] = {
        "enabled": True,
        "keys": [
            {"name": "alice", "sha256": hash_key("sk-alice-key")},
            {"name": "smoke", "sha256": hash_key("sk-smoke-key"), "can_target_pool": True},
        ],
    }
    cfg["admin"] = {"token": ADMIN_TOKEN}
    gw = start_gateway(procs, tmp_path, cfg)
    url = f"{gw.url}/v1/chat/completions"

    # No key, and a malformed one: 401 in OpenAI's shape, nothing upstream.
    for headers in ({}, {"Authorization": "sk-alice-key"}, {"Authorization": "Bearer "}):
        st, h, body = http("POST", url, BODY, headers)
        assert st == 401
        assert h["WWW-Authenticate"] == "Bearer"
        err = json.loads(body)["error"]
        assert err["code"] == "invalid_api_key"
        assert err["type"]
        assert err["message"]
    with pytest.raises(openai.AuthenticationError):  # the SDK sending no Authorization
        client(gw, "unused").chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=1,
            extra_headers={"Authorization": openai.Omit()},
        )
    with pytest.raises(openai.AuthenticationError) as caught:
        client(gw, "sk-wrong").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert caught.value.status_code == 401
    assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
    assert stable.stats()["requests"] == canary.stats()["requests"] == 0

    # The right key: served; the replica sees the pool's key, not the client's.
    alice = client(gw, "sk-alice-key")
    assert alice.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).choices
    seen = stable.stats()["last_headers"]
    assert seen["authorization"] == "Bearer backend-secret"
    assert "sk-alice-key" not in json.dumps(seen)

    # The override needs authority: alice has none.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        alice.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=1,
            extra_headers={"x-llmproxy-pool": "canary"},
        )
    assert denied.value.status_code == 403
    wrong_admin = {"x-llmproxy-pool": "canary", "x-llmproxy-admin-token": "not-it"}
    with pytest.raises(openai.PermissionDeniedError):
        alice.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_headers=wrong_admin
        )
    assert canary.stats()["requests"] == 0

    # With the admin token, or a key allowed to: the canary (in no route) serves.
    admin = {"x-llmproxy-pool": "canary", "x-llmproxy-admin-token": ADMIN_TOKEN}
    for sdk, extra in ((alice, admin), (client(gw, "sk-smoke-key"), {"x-llmproxy-pool": "canary"})):
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_headers=extra
        )
        assert raw.status_code == 200
        assert raw.headers["x-llmproxy-pool"] == "canary"
        seen = canary.stats()["last_headers"]
        # The canary pool has no key of its own: no Authorization at all, and
        # neither the override nor the admin token goes upstream.
        assert "authorization" not in seen
        assert "x-llmproxy-pool" not in seen
        assert "x-llmproxy-admin-token" not in seen
        assert ADMIN_TOKEN not in json.dumps(seen)
    assert canary.stats()["requests"] == 2

    with pytest.raises(openai.NotFoundError):
        client(gw, "sk-smoke-key").chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_headers={"x-llmproxy-pool": "nope"}
        )


def test_without_gateway_auth_the_pool_key_replaces_the_clients(
    tmp_path: Path, procs: list[Proc]
) -> None:
    sim = start_sim(procs, tmp_path, name="sim")
    gw = start_gateway(procs, tmp_path, pool_config(sim.url, health=NO_HEALTH, api_key="pool-key"))
    assert (
        client(gw, "sk-client-own")
        .chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        .choices
    )
    seen = sim.stats()["last_headers"]
    assert seen["authorization"] == "Bearer pool-key"
    assert "sk-client-own" not in json.dumps(seen)


# -- admin API ---------------------------------------------------------------------------


def test_every_admin_endpoint_needs_the_token(tmp_path: Path, procs: list[Proc]) -> None:
    stable = start_sim(procs, tmp_path, name="stable")
    canary = start_sim(procs, tmp_path, name="canary")
    cfg = two_pools(stable, canary, canary={"canary_pool": "canary", "stable_pool": "stable"})
    cfg["admin"] = {"token": ADMIN_TOKEN}
    gw = start_gateway(procs, tmp_path, cfg)
    backend = stable.url.removeprefix("http://")
    calls: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/admin/state", None, 200, "pools"),
        ("POST", f"/admin/backends/stable/{backend}/drain", None, 200, "draining"),
        ("POST", f"/admin/backends/stable/{backend}/undrain", None, 200, "draining"),
        ("POST", "/admin/routes/chat/weights", {"weights": {"stable": 50, "canary": 50}}, 200,
         "split"),
        ("POST", "/admin/routes/chat/canary/promote", None, 200, "state"),
        ("POST", "/admin/routes/chat/canary/rollback", None, 200, "state"),
        ("POST", "/admin/reload", None, 200, "ok"),
    ]  # fmt: skip
    bad_tokens: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": ADMIN_TOKEN},  # no scheme
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"x-llmproxy-admin-token": ADMIN_TOKEN},  # the proxy-side header is not the admin's
    ]
    for method, path, body, _, _ in calls:
        for headers in bad_tokens:
            st, h, text = http(method, f"{gw.admin_url}{path}", body, headers)
            assert st == 401, (path, headers, st)
            assert json.loads(text)["error"]["code"] == "invalid_api_key"
            assert h["WWW-Authenticate"] == "Bearer"
    # Nothing changed while refused.
    state = gw.state(ADMIN_TOKEN)
    assert not state["pools"]["stable"]["backends"][0]["draining"]
    assert state["routes"][0]["canary"]["weight"] == 10

    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for method, path, body, want, key in calls:
        st, _, text = http(method, f"{gw.admin_url}{path}", body, auth)
        assert st == want, (path, st, text)
        assert key in json.loads(text), (path, text)
        if path.endswith("/drain"):
            assert json.loads(text)["draining"] is True
            assert gw.state(ADMIN_TOKEN)["pools"]["stable"]["backends"][0]["draining"] is True
        elif path.endswith("/promote"):
            assert json.loads(text)["weight"] == 100
        elif path.endswith("/rollback"):
            assert json.loads(text) | {"reason": ""} == {
                "route": "chat", "state": "rolled_back", "weight": 0, "reason": ""
            }  # fmt: skip
            assert metric(gw, "llmproxy_canary_rollbacks_total", route="chat") == 1
    # Reload put the configured weights back.
    assert gw.state(ADMIN_TOKEN)["routes"][0]["canary"]["weight"] == 10

    # The open endpoints stay open; an unknown backend or route is a 404.
    for path in ("/metrics", "/healthz", "/readyz", "/"):
        assert http("GET", f"{gw.admin_url}{path}")[0] == 200, path
    assert http("POST", f"{gw.admin_url}/admin/backends/stable/nope/drain", None, auth)[0] == 404
    assert http("POST", f"{gw.admin_url}/admin/routes/nope/canary/rollback", None, auth)[0] == 404


def test_a_reload_rotates_the_admin_token(tmp_path: Path, procs: list[Proc]) -> None:
    sim = start_sim(procs, tmp_path, name="sim")
    cfg = pool_config(sim.url, health=NO_HEALTH)
    cfg["admin"] = {"token": ADMIN_TOKEN}
    gw = start_gateway(procs, tmp_path, cfg)
    old = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    new = {"Authorization": "Bearer rotated-token"}
    assert http("GET", f"{gw.admin_url}/admin/state", headers=new)[0] == 401

    written = yaml.safe_load(gw.config_path.read_text())
    written["admin"]["token"] = "rotated-token"
    gw.config_path.write_text(yaml.safe_dump(written))
    st, _, body = http("POST", f"{gw.admin_url}/admin/reload", headers=old)
    assert st == 200, body

    assert http("GET", f"{gw.admin_url}/admin/state", headers=old)[0] == 401
    assert http("GET", f"{gw.admin_url}/admin/state", headers=new)[0] == 200
    # The pool override follows the same token.
    override = {"x-llmproxy-pool": "main"}
    chat = f"{gw.url}/v1/chat/completions"
    assert http("POST", chat, BODY, {**override, "x-llmproxy-admin-token": ADMIN_TOKEN})[0] == 403
    assert (
        http("POST", chat, BODY, {**override, "x-llmproxy-admin-token": "rotated-token"})[0] == 200
    )

    # A reload that drops the token does not open the admin API.
    del written["admin"]["token"]
    gw.config_path.write_text(yaml.safe_dump(written))
    assert http("POST", f"{gw.admin_url}/admin/reload", headers=new)[0] == 200
    assert http("GET", f"{gw.admin_url}/admin/state")[0] == 401
    assert http("GET", f"{gw.admin_url}/admin/state", headers=new)[0] == 200
