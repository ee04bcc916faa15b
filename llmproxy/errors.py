"""The error family the proxy itself raises, and its one mapping to HTTP.

Every error the gateway makes reaches the client as OpenAI-shaped JSON,
``{"error": {"message", "type", "code"}}``, so that OpenAI SDKs raise their
usual exception classes. Each class also inherits the builtin it resembles,
as aiohttp's own exceptions do, so callers can catch either.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

log = logging.getLogger(__name__)


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ProxyError, ValueError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(ProxyError, LookupError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError, ValueError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    """The client stopped sending the rest of its request."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ExpectationFailed(ProxyError):
    status = 417
    type = "invalid_request_error"
    code = "expectation_failed"


class Unauthorized(ProxyError, PermissionError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class UpstreamError(ProxyError, ConnectionError):
    """No backend could give a usable answer before the commit point."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class NoEligibleBackend(UpstreamError):
    status = 503
    code = "no_healthy_upstream"


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "upstream_timeout"


def error_body(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, type_, code),
        content_type="application/json",
        headers=headers,
    )


def proxy_error_response(exc: ProxyError) -> web.Response:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.headers)


def http_exception_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (413 from ``client_max_size``, 404...) in OpenAI's shape."""
    type_ = "invalid_request_error" if exc.status < 500 else "server_error"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return error_response(exc.status, exc.reason, type_, None, headers)


def sse_error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """The last event of a stream that failed after the commit point."""
    payload = {"error": {"message": message, "type": type_, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The isolation boundary: whatever escapes becomes OpenAI-shaped JSON."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return proxy_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_exception_response(exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return proxy_error_response(ProxyError("internal error in the gateway"))
