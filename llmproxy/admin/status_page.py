"""The live status page served at ``GET /`` of the admin listener.

One self-contained HTML document (inline CSS and JavaScript, no external
assets), so it works on an air-gapped host and behind any reverse proxy. The
page polls ``admin/state`` (and ``metrics``, for recent error counts) with
relative URLs, so it also works when the admin listener is mounted under a
path prefix. The admin token is read from a ``#token=...`` URL fragment (never
sent to the server as part of the URL) or typed into a box, and only ever
sent as ``Authorization: Bearer``.

Every value from the gateway is put into the DOM with ``textContent`` or
``setAttribute``; nothing is parsed as HTML. A Content-Security-Policy that
admits only this page's own script and style (by hash) and same-origin
fetches backs that up.

Each backend row carries ``data-pool``, ``data-backend`` and ``data-status``
(``up``, ``down``, ``open``, ``ejected``, ``half-open`` or ``draining``), so
scripts and tests can read the page without parsing its text. The status is
the most serious condition that holds, in that order; ``llmproxy status``
uses the same order.
"""

from __future__ import annotations

import base64
import hashlib

from aiohttp import web

_STYLE = """
:root { --up:#1a7f37; --down:#cf222e; --open:#8b0000; --ejected:#bc4c00; --half:#9a6700;
  --drain:#0550ae; --muted:#57606a; --line:#d0d7de; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2328; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: center;
  padding: .6rem 1rem; background: var(--bg); border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.1rem; margin: 0; }
main { padding: .5rem 1rem 2rem; }
section { margin-top: 1rem; }
h2 { font-size: 1rem; margin: .2rem 0; }
table { border-collapse: collapse; width: 100%; margin-top: .3rem; }
caption { text-align: left; color: var(--muted); padding-bottom: .2rem; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .5rem; text-align: left;
  vertical-align: top; }
th { background: var(--bg); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 0 .45rem; border-radius: .8rem; font-weight: 600;
  color: #fff; background: var(--muted); white-space: nowrap; }
.s-up, .ok { background: var(--up); }
.s-down, .bad { background: var(--down); }
.s-open { background: var(--open); }
.s-ejected { background: var(--ejected); }
.s-half-open, .warn { background: var(--half); }
.s-draining { background: var(--drain); }
tr.row-down, tr.row-open { background: #ffebe9; }
tr.row-ejected, tr.row-half-open { background: #fff8c5; }
tr.row-draining { background: #ddf4ff; }
.bar { display: flex; height: 1.3rem; border: 1px solid var(--line); border-radius: .3rem;
  overflow: hidden; max-width: 40rem; }
.bar span { color: #fff; font-size: .8rem; padding: 0 .3rem; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; background: var(--drain); }
.bar span:nth-child(2n) { background: var(--ejected); }
#banner { padding: .3rem 1rem; }
#banner[data-kind="error"], #banner[data-kind="unauthorized"] { background: #ffebe9;
  color: var(--down); font-weight: 600; }
#banner[data-kind="ok"] { color: var(--muted); }
form { display: inline-flex; gap: .3rem; }
ul.compact { margin: .2rem 0; padding-left: 1.2rem; }
.line { display: flex; flex-wrap: wrap; gap: .3rem 1.2rem; align-items: center; }
"""

_SCRIPT = r"""
"use strict";
(function () {
  const POLL_MS = 1500;
  const WINDOW_MS = 60000;
  const ORDER = ["down", "open", "ejected", "half-open", "draining"];
  const app = document.getElementById("app");
  const banner = document.getElementById("banner");
  const content = document.getElementById("content");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const pause = document.getElementById("pause");
  const samples = [];
  let token = tokenFromFragment();
  let paused = false;
  let timer = null;

  function tokenFromFragment() {
    const m = /(?:^|&)token=([^&]*)/.exec(location.hash.replace(/^#/, ""));
    if (!m) return "";
    try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
  }

  // Builds an element; text children become text nodes, never HTML.
  function h(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = String(v); else e.setAttribute(k, String(v));
    }
    for (const c of [].concat(children === undefined ? [] : children)) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const num = (v, digits) => (v === null || v === undefined) ? "\u2014"
    : Number(v).toFixed(digits === undefined ? 0 : digits);
  const badge = (text, cls) => h("span", {class: "badge " + cls}, text);
  const when = (epoch) => epoch ? new Date(epoch * 1000).toLocaleString() : "never";

  function backendStatus(b) {
    const breaker = (b.breaker && b.breaker.state) || "closed";
    const conds = {
      "down": !b.healthy,
      "open": breaker === "open",
      "ejected": !!(b.outlier && b.outlier.ejected),
      "half-open": breaker === "half_open",
      "draining": !!b.draining,
    };
    for (const s of ORDER) if (conds[s]) return s;
    return "up";
  }

  function parseLabels(text) {
    const out = {};
    const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = re.exec(text)) !== null) out[m[1]] = m[2].replace(/\\(.)/g, "$1");
    return out;
  }

  // Per pool/backend counters from the scrape: requests, 5xx, upstream errors.
  async function scrapeCounts() {
    let text;
    try {
      const resp = await fetch("metrics", {cache: "no-store"});
      if (!resp.ok) return null;
      text = await resp.text();
    } catch (e) { return null; }
    const counts = new Map();
    for (const line of text.split("\n")) {
      const isReq = line.startsWith("llmproxy_requests_total{");
      if (!isReq && !line.startsWith("llmproxy_upstream_errors_total{")) continue;
      const close = line.lastIndexOf("}");
      const labels = parseLabels(line.slice(line.indexOf("{") + 1, close));
      const value = parseFloat(line.slice(close + 1));
      if (!isFinite(value)) continue;
      const key = labels.pool + "\u0000" + labels.backend;
      const c = counts.get(key) || {req: 0, err5xx: 0, upstream: 0};
      if (isReq) {
        c.req += value;
        if (/^5/.test(labels.code || "")) c.err5xx += value;
      } else {
        c.upstream += value;
      }
      counts.set(key, c);
    }
    return counts;
  }

  // Counter increases over the last WINDOW_MS (a counter that went down was reset).
  function recentErrors(counts) {
    const now = Date.now();
    samples.push({t: now, counts: counts});
    while (samples.length > 2 && now - samples[1].t >= WINDOW_MS) samples.shift();
    if (samples.length < 2) return null;
    const first = samples[0];
    const out = new Map();
    for (const [key, c] of counts) {
      const o = first.counts.get(key) || {req: 0, err5xx: 0, upstream: 0};
      const d = (a, b) => a >= b ? a - b : a;
      out.set(key, {req: d(c.req, o.req), err5xx: d(c.err5xx, o.err5xx),
        upstream: d(c.upstream, o.upstream), seconds: (now - first.t) / 1000});
    }
    return out;
  }

  function renderGateway(s) {
    const r = s.last_reload || {};
    const items = [
      h("span", {}, ["gateway ", s.ready ? badge("ready", "ok") : badge("not ready", "bad")]),
      s.draining ? badge("draining", "s-draining") : null,
      h("span", {class: "muted"}, "config: " + (s.config_source || "(inline)")),
      h("span", {"data-reload": r.ok ? "ok" : "failed"}, ["last reload ",
        r.ok ? badge("ok", "ok") : badge("failed", "bad"), " ", h("span", {class: "muted"},
        when(r.at))]),
    ];
    const sec = h("section", {id: "gateway", "data-ready": String(!!s.ready),
      "data-draining": String(!!s.draining)}, h("div", {class: "line"}, items));
    if ((r.errors || []).length) {
      sec.append(h("div", {}, ["reload errors:",
        h("ul", {class: "compact"}, r.errors.map((e) => h("li", {}, e)))]));
    }
    if ((r.changes || []).length) {
      sec.append(h("div", {class: "muted"}, ["last changes:",
        h("ul", {class: "compact"}, r.changes.slice(-10).map((c) => h("li", {}, c)))]));
    }
    return sec;
  }

  function renderRoutes(routes) {
    const rows = routes.map((r) => {
      const total = r.split.reduce((a, t) => a + t.weight, 0) || 1;
      const label = (t) => t.pool + " " + (100 * t.weight / total).toFixed(1) + "%";
      const bar = h("div", {class: "bar"}, r.split.map((t) => {
        const seg = h("span", {"data-pool": t.pool, "data-weight": t.weight, title: label(t)},
          t.pool);
        seg.style.width = (100 * t.weight / total) + "%";
        return seg;
      }));
      const legend = r.split.map(label).join(", ") + (r.split.length > 1 ? " (canary split)" : "");
      return h("tr", {"data-route": r.name, "data-canary": String(r.split.length > 1)}, [
        h("td", {}, r.name),
        h("td", {}, [bar, h("div", {class: "muted"}, legend)]),
        h("td", {}, (r.fallback || []).join(", ") || "\u2014"),
        h("td", {}, r.sticky || "none"),
      ]);
    });
    return h("section", {id: "routes"}, h("table", {}, [
      h("caption", {}, "Routes and traffic split"),
      h("thead", {}, h("tr", {}, ["route", "split", "fallback", "sticky"].map(
        (c) => h("th", {scope: "col"}, c)))),
      h("tbody", {}, rows),
    ]));
  }

  function renderBackend(poolName, b, recent) {
    const status = backendStatus(b);
    const br = b.breaker || {};
    const ol = b.outlier || {};
    const rec = recent ? recent.get(poolName + "\u0000" + b.name) : null;
    let errors = "collecting\u2026";
    if (rec) {
      const pct = rec.req ? " (" + (100 * rec.err5xx / rec.req).toFixed(1) + "%)" : "";
      errors = "5xx " + rec.err5xx + "/" + rec.req + pct + ", upstream errors " + rec.upstream +
        " in " + rec.seconds.toFixed(0) + "s";
    } else if (recent) {
      errors = "no requests";
    }
    return h("tr", {class: "row-" + status, "data-pool": poolName, "data-backend": b.name,
      "data-status": status, "data-healthy": String(!!b.healthy),
      "data-breaker": br.state || "closed", "data-ejected": String(!!ol.ejected),
      "data-draining": String(!!b.draining), "data-in-flight": b.in_flight}, [
      h("td", {}, badge(status.toUpperCase(), "s-" + status)),
      h("td", {}, [b.name, h("div", {class: "muted"}, b.url)]),
      h("td", {}, [b.healthy ? "healthy" : "unhealthy",
        b.health_detail ? h("div", {class: "muted"}, b.health_detail) : null]),
      h("td", {}, [String(br.state || "closed").replace("_", "-"),
        h("div", {class: "muted"}, "fails " + num(br.fail_counter) +
          (br.opened_for_s !== null && br.opened_for_s !== undefined
            ? ", open " + num(br.opened_for_s, 1) + "s" : ""))]),
      h("td", {}, [ol.ejected ? "ejected " + num(ol.ejected_until_in_s, 1) + "s" : "no",
        h("div", {class: "muted"}, "times " + num(ol.times_ejected) +
          ", consecutive failures " + num(ol.consecutive_failures))]),
      h("td", {class: "num"}, num(b.in_flight)),
      h("td", {class: "num"}, [num(b.weight) + " / " + num(b.effective_weight, 2),
        b.slow_start ? h("div", {}, badge("slow start", "warn")) : null]),
      h("td", {class: "num"}, num(ol.ttfb_ewma_ms, 1)),
      h("td", {}, errors),
    ]);
  }

  function renderPool(name, p, routes, recent) {
    const backends = p.backends || [];
    const shares = [];
    for (const r of routes) {
      const total = r.split.reduce((a, t) => a + t.weight, 0) || 1;
      for (const t of r.split) {
        if (t.pool === name) shares.push(r.name + " " + (100 * t.weight / total).toFixed(1) + "%");
      }
    }
    const rb = p.retry_budget || {};
    const eligibleCls = p.eligible === 0 ? "bad" : (p.eligible < backends.length ? "warn" : "ok");
    const cols = ["status", "backend", "health", "breaker", "ejection", "in flight",
      "weight / effective", "TTFB EWMA (ms)", "recent errors"];
    return h("section", {class: "pool", "data-pool": name, "data-eligible": p.eligible}, [
      h("h2", {}, ["pool ", name, " ",
        badge(p.eligible + "/" + backends.length + " eligible", eligibleCls)]),
      h("div", {class: "muted"}, "balancer " + p.balancer + "; retry budget: " +
        num(rb.retries) + " retries / " + num(rb.requests) + " requests, " +
        (rb.allowed_now ? "retries allowed" : "exhausted") +
        (shares.length ? "; traffic: " + shares.join(", ") : "")),
      h("table", {}, [
        h("thead", {}, h("tr", {}, cols.map((c) => h("th", {scope: "col"}, c)))),
        h("tbody", {}, backends.map((b) => renderBackend(name, b, recent))),
      ]),
    ]);
  }

  function render(state, recent) {
    const routes = state.routes || [];
    const parts = [renderGateway(state), renderRoutes(routes)];
    for (const [name, p] of Object.entries(state.pools || {})) {
      parts.push(renderPool(name, p, routes, recent));
    }
    content.replaceChildren(...parts);
  }

  function setConn(kind, text) {
    app.setAttribute("data-state", kind);
    banner.setAttribute("data-kind", kind);
    banner.textContent = text;
  }

  async function poll() {
    const headers = token ? {"Authorization": "Bearer " + token} : {};
    let resp;
    try {
      resp = await fetch("admin/state", {headers: headers, cache: "no-store"});
    } catch (e) {
      setConn("error", "admin API unreachable (" + e.message + "); showing the last state");
      return;
    }
    if (resp.status === 401) {
      setConn("unauthorized", "401: the admin token is missing or wrong; enter it above");
      return;
    }
    if (!resp.ok) {
      setConn("error", "GET admin/state answered " + resp.status + "; showing the last state");
      return;
    }
    let state;
    try { state = await resp.json(); } catch (e) {
      setConn("error", "admin/state did not answer JSON");
      return;
    }
    const counts = await scrapeCounts();
    render(state, counts ? recentErrors(counts) : null);
    setConn("ok", "updated " + new Date().toLocaleTimeString());
    app.setAttribute("data-updated", String(Date.now()));
  }

  async function loop() {
    timer = null;
    if (!paused) {
      try { await poll(); } catch (e) { setConn("error", "render failed: " + e); }
    }
    timer = setTimeout(loop, POLL_MS);
  }

  function restart() {
    if (timer !== null) clearTimeout(timer);
    loop();
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = input.value;
    restart();
  });
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "resume" : "pause";
    pause.setAttribute("aria-pressed", String(paused));
    app.setAttribute("data-paused", String(paused));
  });
  window.addEventListener("hashchange", () => { token = tokenFromFragment(); restart(); });
  loop();
})();
"""


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>llmproxy status</title>
<style>{_STYLE}</style>
</head>
<body>
<div id="app" data-state="loading" data-paused="false">
<header>
<h1>llmproxy status</h1>
<form id="token-form" autocomplete="off">
<label for="token-input">admin token</label>
<input id="token-input" type="password" size="24">
<button type="submit">use</button>
</form>
<button id="pause" type="button" aria-pressed="false">pause</button>
</header>
<div id="banner" role="status" aria-live="polite" data-kind="loading">loading\u2026</div>
<main id="content"></main>
</div>
<script>{_SCRIPT}</script>
</body>
</html>
"""

_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; "
        f"script-src {_csp_hash(_SCRIPT)}; "
        f"style-src {_csp_hash(_STYLE)}; "
        "connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def status_page_html() -> str:
    """The page, for tests and for anyone who wants to save it."""
    return _PAGE


async def status_page_handler(request: web.Request) -> web.Response:
    """``GET /``: the page itself carries no state, so it needs no token;
    the data it fetches does."""
    return web.Response(text=_PAGE, content_type="text/html", headers=_HEADERS)
