"""What of an upstream response's head reaches the client."""

from __future__ import annotations

from multidict import CIMultiDict

from llmproxy.upstream.headers import client_response_fields, client_response_headers

UPSTREAM = CIMultiDict(
    [
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "hop-by-hop: named by Connection"),
        ("Transfer-Encoding", "chunked"),
        ("X-Request-Id", "the replica's"),
        ("x-llmproxy-backend", "spoofed"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-RateLimit-Remaining-Requests", "the replica's"),
    ]
)


def test_fields_are_the_headers_map_as_a_list() -> None:
    assert client_response_fields(UPSTREAM, None) == list(client_response_headers(UPSTREAM).items())
    assert client_response_fields(UPSTREAM, None) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-RateLimit-Remaining-Requests", "the replica's"),
    ]


def test_the_gateways_own_fields_replace_the_upstreams_of_the_same_name() -> None:
    ours = {"x-ratelimit-remaining-requests": "9", "x-ratelimit-limit-requests": "10"}
    fields = client_response_fields(UPSTREAM, ours)
    assert fields == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("x-ratelimit-remaining-requests", "9"),
        ("x-ratelimit-limit-requests", "10"),
    ]
    # As CIMultiDict.update does it for the response map.
    expected = client_response_headers(UPSTREAM)
    expected.update(ours)
    assert sorted((k.lower(), v) for k, v in fields) == sorted(
        (k.lower(), v) for k, v in expected.items()
    )
