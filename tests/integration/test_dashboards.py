"""The Grafana dashboard and the Prometheus alert rules in deploy/observability.

They are code that nothing else runs until an incident, so they are checked
here: both files parse; every query is valid PromQL (``promtool``); the alert
rules pass ``promtool check rules`` and fire as intended on synthetic series
(``promtool test rules``); and every metric and label they name exists in
the scrape of a real gateway that served some traffic.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway, Sim, http, pool_config, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "observability" / "alerts.yaml"

#: Metrics the dashboard and alerts already use that work in progress adds to
#: the gateway (rate limits, token usage, inter-token latency, mid-stream
#: failures, canary). Sample name -> the labels they will carry. A metric
#: listed here is only trusted while the scrape does not have it: once it
#: lands, the real scrape is what is checked, and the entry can be deleted.
#: Empty this as they land.
PENDING_METRICS: dict[str, tuple[str, ...]] = {}

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: Grafana's variables, replaced by something PromQL accepts.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
SEVERITIES = {"critical", "warning", "info"}
FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 0.5, "healthy_threshold": 1,
               "unhealthy_threshold": 1, "jitter": 0}  # fmt: skip
BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

_METRIC = re.compile(r"\b(llmproxy_[a-zA-Z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(llmproxy_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is required to check the alert rules and was not found: "
            "install Debian's package with `apt-get install -y prometheus`"
        )
    return path


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _alerts() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text())  # type: ignore[no-any-return]


def _panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from _panels(panel)  # collapsed rows hold their panels


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _alerts()["groups"] for rule in group["rules"]]


def _promql(expr: str) -> str:
    """A Grafana query as plain PromQL: intervals become durations, template
    variables (all used inside regex matchers) match anything."""

    def sub(m: re.Match[str]) -> str:
        return GRAFANA_INTERVALS.get(m.group(1), ".*")

    return re.sub(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)\}?", sub, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", _promql(target["expr"])))
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = _LABEL_VALUES.match(var["definition"])
            assert m, f"variable {var['name']}: expected label_values(SELECTOR, LABEL)"
            out.append((f"variable {var['name']}", _promql(m.group(1))))
    return out


def alert_queries() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in _rules()]


# -- structure -------------------------------------------------------------------


def test_dashboard_parses_and_is_self_consistent() -> None:
    dash = _dashboard()
    assert dash["uid"]
    assert dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    panels = list(_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] <= g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}  # fmt: skip
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].strip(), p["title"]
    for name in ("instance", "route", "pool", "backend"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_what_an_operator_needs() -> None:
    panels = [p for p in _panels(_dashboard()) if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]

    def has(*parts: str) -> bool:
        return any(all(part in e for part in parts) for e in exprs)

    for by in ("route", "pool"):  # RED: rate, errors, duration
        assert has(f"sum by ({by}) (rate(llmproxy_requests_total"), by
        assert has(f"sum by ({by}) (rate(llmproxy_requests_total", 'code=~"5.."'), by
        assert has("histogram_quantile(0.95", by, "llmproxy_request_duration_seconds_bucket"), by
    for q in ("0.5", "0.95", "0.99"):
        assert has(f"histogram_quantile({q}", "llmproxy_time_to_first_byte_seconds_bucket"), q
    assert has("rate(llmproxy_tokens_total")
    assert has("llmproxy_retries_total")
    assert has("llmproxy_retry_budget_exhausted_total")
    assert has("llmproxy_ratelimited_total")
    assert has("llmproxy_canary_weight")
    assert has("llmproxy_canary_rollbacks_total")
    timelines = {m for p in panels if p["type"] == "state-timeline"
                 for t in p["targets"] for m in _METRIC.findall(t["expr"])}  # fmt: skip
    assert {"llmproxy_backend_healthy", "llmproxy_breaker_state"} <= timelines


def test_alert_rules_are_complete() -> None:
    rules = _rules()
    by_name = {r["alert"]: r for r in rules}
    assert len(by_name) == len(rules), "alert names must be unique"
    required = {  # what the alert is for -> a metric its expression must use
        "LLMProxyBackendDown": "llmproxy_backend_healthy",
        "LLMProxyBreakerOpen": "llmproxy_breaker_state",
        "LLMProxyPoolBelowMinAvailable": "llmproxy_backend_available",
        "LLMProxyHighErrorRate": "llmproxy_requests_total",
        "LLMProxyTimeToFirstTokenHigh": "llmproxy_time_to_first_byte_seconds_bucket",
        "LLMProxyRetryBudgetExhausted": "llmproxy_retry_budget_exhausted_total",
        "LLMProxyConfigReloadFailed": "llmproxy_config_last_reload_successful",
    }
    for name, metric in required.items():
        assert metric in by_name[name]["expr"], name
    for r in rules:
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", ""))), f"{r['alert']}: needs for:"
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert r["annotations"]["description"].strip(), r["alert"]


# -- promtool --------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_alert_rules_pass_promtool_check() -> None:
    r = _run(_promtool(), "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query as a recording rule, so ``promtool check rules`` parses it."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, (_, q) in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _run(_promtool(), "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(rules)} rules found" in r.stdout


def _annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations rendered for ``labels`` (they use only ``$labels``)."""
    rule = next(r for r in _rules() if r["alert"] == alert)
    out = {}
    for key, template in rule["annotations"].items():
        text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
        assert "{{" not in text, f"{alert}.{key}: only $labels is rendered here"
        out[key] = text
    return out


def _fires(alert: str, at: str, *alerts: dict[str, str]) -> dict[str, Any]:
    exp = []
    for labels in alerts:
        severity = next(r for r in _rules() if r["alert"] == alert)["labels"]["severity"]
        exp.append({"exp_labels": {**labels, "severity": severity},
                    "exp_annotations": _annotations(alert, labels)})  # fmt: skip
    return {"eval_time": at, "alertname": alert, "exp_alerts": exp}


def test_alert_rules_fire_as_intended(tmp_path: Path) -> None:
    gw = {"job": "llmproxy", "instance": "gw:8081"}
    sel = 'job="llmproxy",instance="gw:8081"'

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        extra = "".join(f',{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{sel}{extra}}}", "values": values}

    a = {"pool": "main", "backend": "a"}
    b = {"pool": "main", "backend": "b"}
    input_series = [
        # a goes down at 2m; b stays up. a's breaker opens at 3m.
        series("llmproxy_backend_healthy", "1 1 0x20", **a),
        series("llmproxy_backend_healthy", "1x22", **b),
        series("llmproxy_breaker_state", "0 0 0 2x20", **a),
        series("llmproxy_breaker_state", "0x22", **b),
        # one of two available from 1m; none from 10m.
        series("llmproxy_backend_available", "1 0x22", **a),
        series("llmproxy_backend_available", "1x9 0x13", **b),
        # route chat: 60 ok and 10 failed requests a minute; 1-10 s to first byte.
        series("llmproxy_requests_total", "0+60x22", route="chat", pool="main", backend="a",
               code="200"),
        series("llmproxy_requests_total", "0+10x22", route="chat", pool="main", backend="a",
               code="503"),
        series("llmproxy_time_to_first_byte_seconds_bucket", "0x22", route="chat", pool="main",
               backend="a", le="1.0"),
        series("llmproxy_time_to_first_byte_seconds_bucket", "0+70x22", route="chat",
               pool="main", backend="a", le="10.0"),
        series("llmproxy_time_to_first_byte_seconds_bucket", "0+70x22", route="chat",
               pool="main", backend="a", le="+Inf"),
        series("llmproxy_retry_budget_exhausted_total", "0+1x22", pool="main"),
        series("llmproxy_config_last_reload_successful", "1 1 0x20"),
    ]  # fmt: skip
    route = {"job": "llmproxy", "route": "chat"}
    pool = {**gw, "pool": "main"}
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input_series,
            "alert_rule_test": [
                _fires("LLMProxyBackendDown", "3m"),  # down, but not for 2m yet
                _fires("LLMProxyBackendDown", "5m", {**gw, **a}),
                _fires("LLMProxyBreakerOpen", "5m", {**gw, **a}),
                _fires("LLMProxyPoolBelowMinAvailable", "7m", pool),
                _fires("LLMProxyPoolNoAvailableBackend", "9m"),
                _fires("LLMProxyPoolNoAvailableBackend", "12m", pool),
                _fires("LLMProxyHighErrorRate", "15m", route),
                _fires("LLMProxyTimeToFirstTokenHigh", "20m", route),
                _fires("LLMProxyRetryBudgetExhausted", "15m", pool),
                _fires("LLMProxyConfigReloadFailed", "1m"),
                _fires("LLMProxyConfigReloadFailed", "5m", gw),
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "alerts-test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    r = _run(_promtool(), "test", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# -- against a real scrape -------------------------------------------------------


def _scrape_catalogue(text: str) -> dict[str, set[str] | None]:
    """Sample name -> its label names (None: declared, but no sample yet)."""
    catalogue: dict[str, set[str] | None] = {}
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            catalogue.setdefault(family.name + suffix, None)
        for sample in family.samples:
            known = catalogue.get(sample.name) or set()
            catalogue[sample.name] = known | set(sample.labels)
    return catalogue


def _label_problems(where: str, expr: str, catalogue: dict[str, set[str] | None]) -> list[str]:
    problems = []
    labels_of: dict[str, set[str] | None] = {}
    for metric in set(_METRIC.findall(expr)):
        if metric in catalogue:
            labels_of[metric] = catalogue[metric]
        elif metric in PENDING_METRICS:
            labels_of[metric] = set(PENDING_METRICS[metric])
        else:
            problems.append(f"{where}: {metric} is not in the gateway's scrape")
    for metric, matchers in _SELECTOR.findall(expr):
        known = labels_of.get(metric)
        for label in _MATCHER.findall(matchers):
            if known is not None and label not in known | TARGET_LABELS:
                problems.append(f"{where}: {metric} has no label {label!r}")
    if labels_of and all(v is not None for v in labels_of.values()):
        union = set().union(*(v for v in labels_of.values() if v is not None)) | TARGET_LABELS
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                if label not in union:
                    problems.append(f"{where}: groups by {label!r}, which no metric has")
    return problems


def test_every_metric_and_label_used_exists_in_a_real_scrape(tmp_path: Path) -> None:
    good = Sim(tmp_path, name="good")
    failing = Sim(tmp_path, "--error-rate", "1", "--error-status", "503", name="failing")
    flaky = [
        Sim(tmp_path, "--model", "flaky-model", "--error-rate", "1", "--error-status", "503",
            name=f"flaky{i}")
        for i in range(2)
    ]  # fmt: skip
    sick = Sim(tmp_path, "--unhealthy", name="sick")
    cut = Sim(tmp_path, "--model", "cut-model", "--cut-after-tokens", "1", name="cut")
    cfg = pool_config(
        good.url,
        failing.url,
        health=FAST_HEALTH,
        breaker={"failure_threshold": 2, "reset_timeout_s": 60},
        outlier={"consecutive_failures": 2},
    )
    cfg["pools"]["dead"] = {"backends": [sick.url], "health": FAST_HEALTH}
    cfg["pools"]["flaky"] = {
        "backends": [f.url for f in flaky],
        "retry": {"attempts": 2, "budget_ratio": 0.01, "min_retries": 0},
    }
    cfg["pools"]["cut"] = {"backends": [cut.url], "health": FAST_HEALTH}
    cfg["routes"][:0] = [
        {"name": "dead", "match": {"model": "dead-model"}, "pool": "dead"},
        {"name": "flaky", "match": {"model": "flaky-model"}, "pool": "flaky"},
        {"name": "cut", "match": {"model": "cut-model"}, "pool": "cut"},
        {
            "name": "canary",
            "match": {"model": "canary-model"},
            "split": [{"pool": "main", "weight": 90}, {"pool": "cut", "weight": 10}],
            "canary": {"canary_pool": "cut", "stable_pool": "main"},
        },
    ]
    cfg["rate_limits"] = {"rules": [{"key": "header:x-limit-me", "requests_per_minute": 1}]}
    gw = Gateway(tmp_path, cfg)
    try:
        wait_for(lambda: 'to="down"' in gw.metrics(), what="the sick backend marked down")
        # Some fail over (retries, breaker, ejection), some find the budget spent.
        for _ in range(12):
            http("POST", f"{gw.url}/v1/chat/completions", BODY)
        assert http("POST", f"{gw.url}/v1/chat/completions", {**BODY, "stream": True})[0] == 200
        refused = http("POST", f"{gw.url}/v1/chat/completions", {**BODY, "model": "dead-model"})
        assert refused[0] == 503
        for _ in range(2):  # the first may retry, the second finds the budget spent
            http("POST", f"{gw.url}/v1/chat/completions", {**BODY, "model": "flaky-model"})
        # A mid-stream failure, a rate-limited request, a canary rolled back.
        http(
            "POST", f"{gw.url}/v1/chat/completions", {**BODY, "model": "cut-model", "stream": True}
        )
        limited = {"x-limit-me": "yes"}
        http("POST", f"{gw.url}/v1/chat/completions", BODY, headers=limited)
        assert http("POST", f"{gw.url}/v1/chat/completions", BODY, headers=limited)[0] == 429
        rollback = f"{gw.admin_url}/admin/routes/canary/canary/rollback"
        assert http("POST", rollback)[0] == 200
        assert http("POST", f"{gw.admin_url}/admin/reload")[0] == 200
        scrape = gw.metrics()
    finally:
        gw.stop()
        for s in (good, failing, sick, cut, *flaky):
            s.stop()
    catalogue = _scrape_catalogue(scrape)
    # The traffic above must have produced samples, or the label checks are vacuous.
    without_samples = [
        name for name, labels in catalogue.items()
        if not labels and not name.endswith("_created") and name not in PENDING_METRICS
        and name not in {"llmproxy_config_last_reload_successful"}
        and name not in {"llmproxy_ratelimit_store_errors_total"}  # needs Redis to fail
        and name not in {"llmproxy_upstream_cancelled_total"}  # needs a client to hang up
    ]  # fmt: skip
    assert not without_samples, without_samples

    problems = []
    for where, expr in dashboard_queries() + alert_queries():
        problems += _label_problems(where, expr, catalogue)
    for panel in _panels(_dashboard()):
        for t in panel.get("targets", []):
            grouped = {x.strip() for g in _GROUPING.findall(t["expr"]) for x in g.split(",")}
            for label in _LEGEND.findall(t.get("legendFormat", "")):
                if grouped and label not in grouped:
                    problems.append(f"panel {panel['title']!r}: legend {{{{{label}}}}} is "
                                    "aggregated away")  # fmt: skip
    for var in _dashboard()["templating"]["list"]:
        m = _LABEL_VALUES.match(var.get("definition", ""))
        if m:
            metric = _METRIC.findall(m.group(1))[0]
            labels = catalogue.get(metric) or set(PENDING_METRICS.get(metric, ()))
            if m.group(2) not in labels | TARGET_LABELS:
                problems.append(f"variable {var['name']}: {metric} has no label {m.group(2)!r}")
    assert not problems, "\n".join(problems)
