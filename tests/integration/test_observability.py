"""Observability seen from outside: the Prometheus scrape and the JSON access
log of a real gateway process after requests whose outcomes the test knows.

The scrape must count exactly what was sent (no more, no less), keep its
label values to config names and a fixed set whatever the clients send, and
the access log must describe each request fully without ever holding a key
or, unless asked to, a prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway, Sim, http, wait_for

MODEL = "sim-model"
NONE = "none"
JSON = {"Content-Type": "application/json"}
#: Labels are sorted (name, value) pairs, so a series is hashable.
Labels = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, Sim]]:
    tmp = tmp_path_factory.mktemp("obs-sims")
    # 25 tokens/s: 40 ms between tokens, so each one is its own chunk on loopback.
    args = ("--model", MODEL, "--ttft-ms", "5", "--tokens-per-s", "25")
    a, b = Sim(tmp, *args, name="sim-a"), Sim(tmp, *args, name="sim-b")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(autouse=True)
def _restore_faults(sims: tuple[Sim, Sim]) -> Iterator[None]:
    yield
    for s in sims:
        assert http("DELETE", f"{s.url}/sim/faults")[0] == 200


def gateway_config(sims: tuple[Sim, Sim], **extra: Any) -> dict[str, Any]:
    a, b = sims
    return {
        "pools": {
            "main": {
                "balancer": "round_robin",
                "backends": [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                "health": {"enabled": False},
            }
        },
        "routes": [
            {"name": "slow", "match": {"model": MODEL, "header": {"x-slow": "1"}}, "pool": "main"},
            {"name": "chat", "match": {"model": MODEL, "path_prefix": "/v1/chat"}, "pool": "main"},
            {
                "name": "text",
                "match": {"model": MODEL, "path_prefix": "/v1/completions"},
                "pool": "main",
            },
        ],
        **extra,
    }


def series(scrape: str, sample: str) -> dict[Labels, float]:
    """Every sample called ``sample`` in the scrape, by its labels."""
    out: dict[Labels, float] = {}
    for family in text_string_to_metric_families(scrape):
        for s in family.samples:
            if s.name == sample:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def by(samples: dict[Labels, float], *names: str) -> dict[tuple[str, ...], float]:
    """Sum the samples over every label but ``names``; zero sums left out."""
    out: dict[tuple[str, ...], float] = {}
    for labels, value in samples.items():
        d = dict(labels)
        key = tuple(d[n] for n in names)
        out[key] = out.get(key, 0.0) + value
    return {k: v for k, v in out.items() if v}


def sse_usage(body: bytes) -> dict[str, int]:
    """The ``usage`` of the last SSE event that carries one."""
    usage = None
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None, body
    return usage  # type: ignore[no-any-return]


def chat(max_tokens: int, *, stream: bool = False, content: str = "hello there") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


class Ledger:
    """What the test sent and what came back: the scrape must match it."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str, str]] = Counter()
        self.tokens: Counter[tuple[str, str, str]] = Counter()
        #: Completion tokens of each stream, by route.
        self.streams: dict[str, list[int]] = {}
        #: Responses that reached the client from a backend, by route.
        self.committed: Counter[str] = Counter()

    def served(self, route: str, resp: aiohttp.ClientResponse, body: bytes, stream: bool) -> None:
        assert resp.status == 200, body
        self.requests[route, "main", resp.headers["x-llmproxy-backend"], "200"] += 1
        self.committed[route] += 1
        usage = sse_usage(body) if stream else json.loads(body)["usage"]
        self.tokens[route, "main", "prompt"] += usage["prompt_tokens"]
        self.tokens[route, "main", "completion"] += usage["completion_tokens"]
        if stream:
            self.streams.setdefault(route, []).append(usage["completion_tokens"])


async def test_scrape_counts_exactly_the_requests_made(
    tmp_path: Path, sims: tuple[Sim, Sim]
) -> None:
    a, _ = sims
    limits = {"rules": [{"name": "limit-me", "key": "header:x-limit-me", "requests_per_minute": 1}]}
    gw = Gateway(tmp_path, gateway_config(sims, rate_limits=limits))
    led = Ledger()
    try:
        async with aiohttp.ClientSession(base_url=gw.url) as s:

            async def send(
                route: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> aiohttp.ClientResponse:
                async with s.post(path, json=body, headers=headers) as r:
                    data = await r.read()
                if r.status == 200:
                    led.served(route, r, data, bool(body.get("stream")))
                return r

            # Successes, streamed and not, on two routes.
            for n in (2, 3, 4):
                await send("chat", "/v1/chat/completions", chat(n))
            for n in (3, 5):
                await send("chat", "/v1/chat/completions", chat(n, stream=True))
            for n in (4, 6):
                body = {"model": MODEL, "prompt": "once upon", "max_tokens": n, "stream": True}
                body["stream_options"] = {"include_usage": True}
                await send("text", "/v1/completions", body)

            # The client's mistakes: no route, so no route/pool/backend label.
            async with s.post("/v1/chat/completions", json={**chat(1), "model": "nope"}) as r:
                assert r.status == 404
            async with s.post("/v1/chat/completions", data=b'{"model": ', headers=JSON) as r:
                assert r.status == 400
            async with s.get("/no/such/path") as r:
                assert r.status == 404
            led.requests[NONE, NONE, NONE, "404"] += 2
            led.requests[NONE, NONE, NONE, "400"] += 1

            # One retry: a answers 503, so the request that lands on it moves to b.
            a.faults(error_rate=1.0, error_status=503)
            for _ in range(3):
                r = await send("chat", "/v1/chat/completions", chat(1))
                if r.headers["x-llmproxy-attempts"] == "2":
                    assert r.headers["x-llmproxy-backend"] == "b"
                    break
                assert r.headers["x-llmproxy-backend"] == "b"
            else:
                pytest.fail("round robin never put a first attempt on backend a")
            a.faults(error_rate=0.0)

            # A rate limit: one request a minute per x-limit-me value.
            await send("chat", "/v1/chat/completions", chat(1), {"x-limit-me": "u1"})
            r = await send("chat", "/v1/chat/completions", chat(1), {"x-limit-me": "u1"})
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            led.requests["chat", NONE, NONE, "429"] += 1

            # A stream the client leaves after its first chunk (500 tokens: 20 s).
            async with s.post(
                "/v1/chat/completions", json=chat(500, stream=True), headers={"x-slow": "1"}
            ) as r:
                assert r.status == 200
                assert await r.content.readany()
                gone = r.headers["x-llmproxy-backend"]
                r.close()
            led.requests["slow", "main", gone, "499"] += 1
            led.committed["slow"] += 1

        sim_gone = sims[0] if gone == "a" else sims[1]
        wait_for(lambda: sim_gone.stats()["cancelled"] == 1, what="the replica to see the cancel")
        total = sum(led.requests.values())
        scrape = wait_for(
            lambda: (
                (m := gw.metrics())
                and sum(series(m, "llmproxy_requests_total").values()) == total
                and m
            ),
            what=f"{total} requests in the scrape",
        )
    finally:
        assert gw.stop() == 0, gw.log()

    got = by(series(scrape, "llmproxy_requests_total"), "route", "pool", "backend", "code")
    assert got == led.requests
    assert by(series(scrape, "llmproxy_retries_total"), "pool", "reason") == {("main", "status"): 1}
    assert by(series(scrape, "llmproxy_upstream_errors_total"), "pool", "backend", "kind") == {
        ("main", "a", "status"): 1
    }
    assert by(series(scrape, "llmproxy_ratelimited_total"), "rule") == {("limit-me:requests",): 1}
    assert by(series(scrape, "llmproxy_upstream_cancelled_total"), "pool", "backend") == {
        ("main", gone): 1
    }
    assert by(series(scrape, "llmproxy_midstream_failures_total"), "pool", "backend") == {}
    assert by(series(scrape, "llmproxy_tokens_total"), "route", "pool", "kind") == led.tokens

    # Every request has a duration, refused ones included.
    durations = by(series(scrape, "llmproxy_request_duration_seconds_count"), "route")
    per_route: Counter[tuple[str]] = Counter()
    for (route, *_), n in led.requests.items():
        per_route[(route,)] += n
    assert durations == per_route

    # Time to first byte: once per response that reached the client from a
    # backend, streamed or not ("text" serves only streams).
    ttfb = series(scrape, "llmproxy_time_to_first_byte_seconds_count")
    assert by(ttfb, "route") == {(r,): n for r, n in led.committed.items()}
    assert led.committed["text"] == len(led.streams["text"]) == 2
    check_buckets(scrape, "llmproxy_time_to_first_byte_seconds")

    # Gaps between chunks: only for streams; n tokens are n writes plus the
    # end (which may share a read with the last token), so n-1 or n gaps.
    gaps = by(series(scrape, "llmproxy_inter_token_seconds_count"), "route")
    for route in ("chat", "text"):
        tokens = led.streams[route]
        assert sum(n - 1 for n in tokens) <= gaps[(route,)] <= sum(tokens), (route, tokens)
    check_buckets(scrape, "llmproxy_inter_token_seconds")
    gap_sum = by(series(scrape, "llmproxy_inter_token_seconds_sum"), "route")
    # 40 ms between tokens at the replica; the mean gap cannot be far below.
    assert gap_sum[("text",)] / gaps[("text",)] > 0.02


def check_buckets(scrape: str, name: str) -> None:
    """Cumulative buckets: non-decreasing, ``+Inf`` equal to ``_count``."""
    counts = series(scrape, f"{name}_count")
    assert counts
    buckets: dict[Labels, list[tuple[float, float]]] = {}
    for labels, value in series(scrape, f"{name}_bucket").items():
        d = dict(labels)
        le = float(d.pop("le"))
        buckets.setdefault(tuple(sorted(d.items())), []).append((le, value))
    assert buckets.keys() == counts.keys()
    for labels, pairs in buckets.items():
        values = [v for _, v in sorted(pairs)]
        assert values == sorted(values), (name, labels)
        assert values[-1] == counts[labels], (name, labels)


#: The metric families whose series the request path creates.
REQUEST_FAMILIES = (
    "llmproxy_requests",
    "llmproxy_request_duration_seconds",
    "llmproxy_time_to_first_byte_seconds",
    "llmproxy_inter_token_seconds",
    "llmproxy_tokens",
    "llmproxy_retries",
    "llmproxy_ratelimited",
    "llmproxy_upstream_cancelled",
    "llmproxy_upstream_errors",
    "llmproxy_midstream_failures",
    "llmproxy_no_eligible_backend",
)


def request_series(scrape: str) -> set[tuple[str, Labels]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(scrape)
        if family.name in REQUEST_FAMILIES
        for s in family.samples
    }


async def test_unknown_models_and_paths_add_no_label_values(
    tmp_path: Path, sims: tuple[Sim, Sim]
) -> None:
    gw = Gateway(tmp_path, gateway_config(sims))
    noise = [f"zq{os.urandom(6).hex()}" for _ in range(51)]
    try:
        async with aiohttp.ClientSession(base_url=gw.url) as s:

            async def junk(i: int, word: str) -> None:
                headers = {"x-slow": word, "X-Request-Id": word, "Authorization": f"Bearer {word}"}
                if i % 3 == 0:  # an unknown model, on a route's own path
                    req = s.post("/v1/chat/completions", json={**chat(1), "model": word})
                elif i % 3 == 1:  # a path no route has, with a model that exists
                    req = s.post(f"/{word}/v1/chat/completions", json=chat(1), headers=headers)
                else:
                    req = s.get(f"/v1/{word}?model={word}", headers=headers)
                async with req as r:
                    assert r.status == 404, await r.text()

            async with s.post("/v1/chat/completions", json=chat(1)) as r:
                assert r.status == 200
            for i in range(3):  # one of each kind, so that every code is there before
                await junk(i, f"seed{i}")
            before = wait_for(
                lambda: (
                    (m := gw.metrics())
                    and sum(series(m, "llmproxy_requests_total").values()) == 4
                    and m
                ),
                what="4 requests in the scrape",
            )
            for i, word in enumerate(noise):
                await junk(i, word)
        after = wait_for(
            lambda: (
                (m := gw.metrics())
                and sum(series(m, "llmproxy_requests_total").values()) == 4 + len(noise)
                and m
            ),
            what="the requests in the scrape",
        )
    finally:
        assert gw.stop() == 0, gw.log()

    assert request_series(after) == request_series(before)
    assert not [w for w in noise if w in after]
    unrouted = by(series(after, "llmproxy_requests_total"), "route", "pool", "backend")
    assert unrouted[NONE, NONE, NONE] == 3 + len(noise)
    allowed = {"main", "a", "b", "slow", "chat", "text", NONE}
    for family in text_string_to_metric_families(after):
        for sample in family.samples:
            for name in ("route", "pool", "backend"):
                assert sample.labels.get(name, NONE) in allowed, sample
            assert sample.labels.get("code", "200").isdigit(), sample


ACCESS_FIELDS = {
    "time", "request_id", "method", "path", "route", "pool", "backend", "attempts", "status",
    "ttfb_ms", "duration_ms", "bytes_sent", "prompt_tokens", "completion_tokens", "client_ip",
    "api_key_name", "stream", "outcome", "error", "trace_id",
}  # fmt: skip
SECRET = "sk-secret-xyz"
WRONG_SECRET = "sk-wrong-secret-456"
QUERY_SECRET = "sk-query-secret-789"


@pytest.mark.parametrize("log_prompts", [False, True], ids=["default", "log_prompts"])
async def test_access_log_has_every_field_and_no_secret(
    tmp_path: Path, sims: tuple[Sim, Sim], log_prompts: bool
) -> None:
    path = tmp_path / "access.log"
    auth = {"enabled": True, "keys": [{"name": "tenant-a", "sha256": sha256(SECRET)}]}
    log_cfg = {"enabled": True, "path": str(path), "log_prompts": log_prompts}
    gw = Gateway(tmp_path, gateway_config(sims, auth=auth, access_log=log_cfg))
    marker = f"MARKER-{os.urandom(6).hex()}"
    key = {"Authorization": f"Bearer {SECRET}"}
    try:
        async with aiohttp.ClientSession(base_url=gw.url) as s:
            async with s.post(
                f"/v1/chat/completions?api_key={QUERY_SECRET}",
                json=chat(3, content=f"say {marker}"),
                headers={**key, "X-Request-Id": "log-1"},
            ) as r:
                assert r.status == 200, await r.text()
                plain = await r.read()
                backend = r.headers["x-llmproxy-backend"]
            body = {"model": MODEL, "prompt": marker, "max_tokens": 2, "stream": True}
            async with s.post(
                "/v1/completions", json=body, headers={**key, "X-Request-Id": "log-2"}
            ) as r:
                assert r.status == 200
                streamed = await r.read()
            async with s.post(
                "/v1/chat/completions",
                json=chat(1, content=marker),
                headers={"Authorization": f"Bearer {WRONG_SECRET}", "X-Request-Id": "log-3"},
            ) as r:
                assert r.status == 401

        def lines() -> dict[str, dict[str, Any]]:
            text = path.read_text() if path.exists() else ""
            return {e["request_id"]: e for e in map(json.loads, text.splitlines())}

        entries = wait_for(lambda: len(got := lines()) == 3 and got, what="3 access log lines")
    finally:
        assert gw.stop() == 0, gw.log()

    fields = ACCESS_FIELDS | ({"prompt"} if log_prompts else set())
    assert all(e.keys() == fields for e in entries.values()), entries
    ok, stream, refused = entries["log-1"], entries["log-2"], entries["log-3"]
    usage = json.loads(plain)["usage"]
    logged_at = datetime.strptime(ok["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - logged_at).total_seconds()) < 60
    assert ok | {"time": None, "ttfb_ms": None, "duration_ms": None, "prompt": None} == {
        "time": None,
        "request_id": "log-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "chat",
        "pool": "main",
        "backend": backend,
        "attempts": 1,
        "status": 200,
        "ttfb_ms": None,
        "duration_ms": None,
        "bytes_sent": len(plain),
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "client_ip": "127.0.0.1",
        "api_key_name": "tenant-a",
        "stream": False,
        "outcome": "ok",
        "error": None,
        "trace_id": None,
        "prompt": None,
    }
    assert 0 < ok["ttfb_ms"] <= ok["duration_ms"]
    assert stream["stream"] is True
    assert stream["bytes_sent"] == len(streamed)
    assert 0 < stream["ttfb_ms"] <= stream["duration_ms"]
    assert (stream["route"], stream["outcome"], stream["api_key_name"]) == (
        "text",
        "ok",
        "tenant-a",
    )
    assert refused["status"] == 401
    assert refused["outcome"] == "rejected"
    assert refused["error"]
    assert (refused["backend"], refused["attempts"], refused["api_key_name"]) == (None, 0, None)
    if log_prompts:
        assert marker in ok["prompt"]
        assert marker in stream["prompt"]

    text = path.read_text()
    for secret in (SECRET, WRONG_SECRET, QUERY_SECRET, "api_key="):
        assert secret not in text
    assert (marker in text) is log_prompts
    # Nor do the gateway's own logs carry a key.
    assert SECRET not in gw.log_path.read_text()
    assert WRONG_SECRET not in gw.log_path.read_text()


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
