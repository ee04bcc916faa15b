"""Checks of the string values that have a grammar: URLs, names, key modes."""

from __future__ import annotations

import ipaddress
import re
import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

#: RFC 9110 ``token``: what an HTTP header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
#: One label of a DNS name: up to 63 characters, no hyphen at either end.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DEFAULT_PORTS: Mapping[str, int] = types.MappingProxyType({"http": 80, "https": 443})

STICKY_MODES = ("none", "ip", "api_key", "header:NAME")
HASH_KEY_MODES = ("header:NAME", "api_key", "ip", "model")
RATE_LIMIT_KEYS = ("api_key", "ip", "route", "global", "header:NAME")
URL_SCHEMES = tuple(_DEFAULT_PORTS)


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a value was refused (a result, so that callers can add the YAML path)."""

    message: str


@dataclass(frozen=True, slots=True)
class BackendAddress:
    #: ``scheme://host:port``: lower-case, port explicit, no trailing slash.
    url: str
    #: ``host:port``, the default backend name.
    host_port: str


def parse_backend_url(text: str) -> BackendAddress | Problem:
    """Normalise a backend URL so that two spellings of one replica compare equal.

    A path is refused
    rather than ignored: the client's request path is forwarded unchanged, so a
    base path such as ``/v1`` would silently not apply.
    """
    text = text.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return Problem(f"malformed URL {text!r}: {exc}")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not text.lower().startswith(f"{scheme}://"):
        return Problem(f"must be an http:// or https:// URL, got {text!r}")
    host = parts.hostname or ""
    if not host:
        return Problem(f"URL {text!r} has no host")
    if parts.username is not None or parts.password is not None:
        return Problem(f"URL {text!r} must not contain credentials")
    if "?" in text or "#" in text:
        return Problem(f"URL {text!r} must not have a query string or fragment")
    if parts.path not in ("", "/"):
        return Problem(
            f"URL {text!r} must not have a path ({parts.path!r});"
            " the client's request path is forwarded unchanged"
        )
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return Problem(f"URL {text!r} has an invalid IPv6 address {host!r}")
        host = f"[{host}]"
    elif not _HOSTNAME.fullmatch(host):
        return Problem(f"URL {text!r} has an invalid host {host!r}")
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    elif port == 0:
        return Problem(f"URL {text!r} has port 0; a backend needs a real port")
    return BackendAddress(url=f"{scheme}://{host}:{port}", host_port=f"{host}:{port}")


def http_url_problem(text: str) -> str | None:
    """Why ``text`` is not an http(s) URL with a host (a path is allowed), or ``None``."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return f"malformed URL {text!r}: {exc}"
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not text.lower().startswith(f"{scheme}://"):
        return f"must be an http:// or https:// URL, got {text!r}"
    if not parts.hostname:
        return f"URL {text!r} has no host"
    if port == 0:
        return f"URL {text!r} has port 0"
    if any(ch.isspace() for ch in text):
        return f"URL {text!r} must not contain whitespace"
    return None


def dns_name_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS name to resolve (a trailing dot is allowed), or ``None``."""
    bare = name.removesuffix(".")
    labels = bare.split(".")
    if len(bare) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return f"must be a DNS name (no scheme, port or path), got {name!r}"
    return None


def header_name_problem(name: str) -> str | None:
    if not _HEADER_NAME.fullmatch(name):
        return f"invalid header name {name!r}"
    return None


def parse_key_mode(text: str, modes: tuple[str, ...], what: str) -> str | Problem:
    """Check a mode such as ``header:NAME``; header names come back lower-cased."""
    if text.startswith("header:") and "header:NAME" in modes:
        name = text.removeprefix("header:").strip()
        problem = header_name_problem(name)
        if problem is not None:
            return Problem(f"{what} {text!r}: {problem}")
        return f"header:{name.lower()}"
    if text in modes and text != "header:NAME":
        return text
    return Problem(f"unknown {what} {text!r} (known: {', '.join(modes)})")


def name_problem(name: str) -> str | None:
    """Names show up in metric labels, headers and admin URLs: keep them plain."""
    if not name.strip():
        return "must not be empty"
    if any(ch.isspace() for ch in name) or "/" in name:
        return f"{name!r} must not contain whitespace or '/'"
    return None
