"""The live status page in a real headless Chromium, against a real gateway
whose backends are real simulated replicas.

Chromium is driven over the Chrome DevTools Protocol with the aiohttp client
the project already depends on: no Selenium, no chromedriver version to
match, and, unlike ``--dump-dom``, the page stays open, so the test reads the
DOM the page's own polling has refreshed (a killed backend must turn "down"
without a reload).

The gateway runs in the test's event loop (its admin app built by
``build_admin_app``), so the page can be mounted next to the real admin
routes even before the composition root registers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from llmproxy.admin.api import build_admin_app
from llmproxy.admin.status_page import status_page_handler, status_page_html
from llmproxy.config import parse_config
from llmproxy.gateway import Gateway
from tests.support import Sim, pool_config

TOKEN = "s3cret-admin-token"
FAST_HEALTH = {"interval_s": 0.1, "timeout_s": 0.5, "healthy_threshold": 1,
               "unhealthy_threshold": 1, "jitter": 0}  # fmt: skip
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0",
)  # fmt: skip
ROWS_JS = """JSON.stringify(Array.from(document.querySelectorAll("tr[data-backend]"),
    (r) => [r.dataset.backend, r.dataset.status, r.textContent]))"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium is required for the status page test and was not found: "
        "install Debian's package with `apt-get install -y chromium`"
    )


class Page:
    """One browser tab over CDP: navigate, and evaluate JavaScript in it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:  # events are not enabled, but skip any that arrive
            msg = await self._ws.receive_json(timeout=15)
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise AssertionError(f"CDP {method}: {msg['error']}")
                return msg["result"]  # type: ignore[no-any-return]

    async def navigate(self, url: str) -> None:
        """Go to ``url`` and wait until its document has loaded."""
        await self.send("Page.navigate", url=url)
        check = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"

        async def loaded() -> bool:
            try:
                return bool(await self.evaluate(check))
            except AssertionError:  # the old document's context went away mid-call
                return False

        await wait_until(loaded, f"{url} to load")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def rows(self) -> dict[str, tuple[str, str]]:
        """Backend name -> (data-status, row text), as the page shows them now."""
        raw = await self.evaluate(ROWS_JS)
        return {name: (status, text) for name, status, text in json.loads(raw)}


async def wait_until(probe: Callable[[], Awaitable[Any]], what: str, within_s: float = 15.0) -> Any:
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within_s}s waiting for {what} (last: {last!r})")


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Page]:
    profile = tmp / "chromium-profile"
    profile.mkdir()
    log = (tmp / "chromium.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        _chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"

        async def port() -> str | None:
            if proc.returncode is not None:
                raise AssertionError(f"chromium exited: {(tmp / 'chromium.log').read_text()}")
            text = port_file.read_text() if port_file.exists() else ""
            return text.split("\n", 1)[0].strip() if "\n" in text else None

        devtools = f"http://127.0.0.1:{await wait_until(port, 'the DevTools port')}"
        async with aiohttp.ClientSession() as http:

            async def page_target() -> str | None:
                async with http.get(f"{devtools}/json/list") as resp:
                    targets = await resp.json()
                pages = [t for t in targets if t.get("type") == "page"]
                return pages[0]["webSocketDebuggerUrl"] if pages else None

            ws_url = await wait_until(page_target, "a page target")
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def admin_listener(config: dict[str, Any]) -> AsyncIterator[str]:
    """The real gateway components and admin app, in this event loop, with the
    status page mounted at ``/`` unless the admin app already serves it."""
    gateway = Gateway(parse_config(config, env={}))
    await gateway.start()
    app = build_admin_app(gateway)
    if not any(r.method == "GET" and r.resource is not None and r.resource.canonical == "/"
               for r in app.router.routes()):  # fmt: skip
        app.router.add_get("/", status_page_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
        await gateway.close()


def _config(*urls: str, token: str | None = TOKEN, names: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg = pool_config(*urls, health=FAST_HEALTH)
    if names:
        cfg["pools"]["main"]["backends"] = [
            {"url": u, "name": n} for u, n in zip(urls, names, strict=True)
        ]
    cfg["admin"] = {"host": "127.0.0.1", "port": 0, "token": token}
    return cfg


def test_page_is_self_contained() -> None:
    html = status_page_html()
    assert "<script src" not in html
    assert '<link rel="stylesheet"' not in html
    for scheme in ("http://", "https://", "//cdn", "@import"):
        assert scheme not in html, scheme
    assert ".innerHTML" not in html
    assert "insertAdjacentHTML" not in html
    assert "document.write" not in html


async def test_page_headers_pin_script_and_style() -> None:
    resp = await status_page_handler(make_mocked_request("GET", "/"))
    assert resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert resp.headers["Cache-Control"] == "no-store"


async def test_killed_backend_turns_down_on_the_live_page(tmp_path: Path) -> None:
    sims = [Sim(tmp_path, name=f"s{i}") for i in range(2)]
    names = [s.url.removeprefix("http://") for s in sims]
    try:
        async with (
            admin_listener(_config(*(s.url for s in sims))) as admin,
            chromium(tmp_path) as page,
        ):
            await page.navigate(f"{admin}/#token={TOKEN}")

            async def both_up() -> dict[str, tuple[str, str]] | None:
                rows = await page.rows()
                ok = sorted(rows) == sorted(names) and all(s == "up" for s, _ in rows.values())
                return rows if ok else None

            await wait_until(both_up, "both backends shown up")
            assert await page.evaluate("document.getElementById('app').dataset.state") == "ok"
            # A marker that survives only if the page is not reloaded.
            await page.evaluate("window.__same_page = 1")

            sims[0].kill()

            async def first_down() -> dict[str, tuple[str, str]] | None:
                rows = await page.rows()
                return rows if rows.get(names[0], ("",))[0] == "down" else None

            rows = await wait_until(first_down, f"{names[0]} shown down")
            assert rows[names[1]][0] == "up"
            assert "unhealthy" in rows[names[0]][1]
            assert await page.evaluate("window.__same_page") == 1
            section = "document.querySelector('section.pool[data-pool=main]').dataset.eligible"
            assert await wait_until(
                lambda: _equals(page.evaluate(section), "1"), "one eligible backend"
            )
    finally:
        for s in sims:
            s.stop()


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_token_box_and_hostile_names_render_as_text(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    hostile = "<b>bold<i>it&amp;"  # names may hold neither whitespace nor '/'
    try:
        async with (
            admin_listener(_config(sim.url, names=(hostile,))) as admin,
            chromium(tmp_path) as page,
        ):
            await page.navigate(f"{admin}/")  # no token in the fragment

            async def state_is(expected: str) -> bool:
                got = await page.evaluate("document.getElementById('app').dataset.state")
                return bool(got == expected)

            await wait_until(lambda: state_is("unauthorized"), "the 401 notice")
            banner = await page.evaluate("document.getElementById('banner').textContent")
            assert "token" in banner

            await page.evaluate(
                f"document.getElementById('token-input').value = {json.dumps(TOKEN)};"
                "document.getElementById('token-form').requestSubmit();"
            )
            await wait_until(lambda: state_is("ok"), "the state, with the typed token")
            rows = await wait_until(page.rows, "the backend row")
            assert list(rows) == [hostile]
            assert hostile in rows[hostile][1]  # shown literally, as text
            assert await page.evaluate("document.querySelectorAll('#content b, #content i')"
                                       ".length") == 0  # fmt: skip
    finally:
        sim.stop()
