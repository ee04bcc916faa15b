"""Header rewriting between client and upstream (RFC 9110 §7.6.1)."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

#: Hop-by-hop headers: they describe one connection and are never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Also dropped from the client's request: the upstream client sets Host
#: from the backend URL and Content-Length from the body; the request id is
#: re-set.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-request-id"}

#: Dropped from the upstream's response: the proxy sets its own.
_RESPONSE_DROP = HOP_BY_HOP | {
    "x-request-id",
    "x-llmproxy-backend",
    "x-llmproxy-pool",
    "x-llmproxy-attempts",
}


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Headers named in ``Connection`` are hop-by-hop for this message too."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(","))


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    request_id: str,
) -> CIMultiDict[str]:
    drop = _REQUEST_DROP
    extra = _connection_tokens(headers)
    if extra:
        drop = drop | extra
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    if client_ip:
        prior = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out["X-Forwarded-Proto"] = scheme
    host = headers.get("Host")
    if host and "X-Forwarded-Host" not in out:
        out["X-Forwarded-Host"] = host
    out["X-Request-Id"] = request_id
    return out


def client_response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    return CIMultiDict(client_response_fields(headers, None))


def client_response_fields(
    headers: MultiMapping[str], replaced: Mapping[str, str] | None
) -> list[tuple[str, str]]:
    """What of the upstream's response head goes to the client, as a list
    of fields (hop-by-hop ones and the gateway's own ``x-*`` dropped), with
    ``replaced`` (the gateway's own, e.g. ``x-ratelimit-*``) in place of any
    the upstream sent under those names: for a head written at once, with no
    map between."""
    drop = _RESPONSE_DROP
    extra = _connection_tokens(headers)
    if extra:
        drop = drop | extra
    if replaced:
        drop = drop | {name.lower() for name in replaced}
    out = [(name, value) for name, value in headers.items() if name.lower() not in drop]
    if replaced:
        out += replaced.items()
    return out
