"""``web.AppKey`` declarations: typed app state, shared by both listeners."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from llmproxy.gateway import Gateway

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
