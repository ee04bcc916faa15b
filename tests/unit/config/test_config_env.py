"""``${VAR}`` interpolation: substitution, defaults, escapes, typing, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmproxy.config import ConfigError, load_config, parse_config
from llmproxy.config.env import substitute


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${A:-dflt}", {}, "dflt"),
        ("${A:-dflt}", {"A": ""}, "dflt"),
        ("${A:-dflt}", {"A": "set"}, "set"),
        ("${A:-}", {}, ""),
        ("${A}", {"A": ""}, ""),
        ("${A:-a:-b}", {}, "a:-b"),
        ("$${A}", {"A": "x"}, "${A}"),
        ("cost: $$5", {}, "cost: $5"),
        ("a $ b $", {}, "a $ b $"),
        ("$$$${A}", {"A": "x"}, "$${A}"),
        ("$${A} ${A}", {"A": "x"}, "${A} x"),
        # Defaults are not interpolated: the default is "${B", then "}" follows.
        ("${A:-${B}}", {"B": "no"}, "${B}"),
    ],
)
def test_substitute(text: str, env: dict[str, str], expected: str) -> None:
    assert substitute(text, env) == (expected, [])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("${MISSING}", "environment variable MISSING is not set and has no default"),
        (
            "x${1A}",
            "invalid variable reference '${1A}' (expected ${NAME} or ${NAME:-default}; write $$"
            " for a literal $)",
        ),
        (
            "${A-b}",
            "invalid variable reference '${A-b}' (expected ${NAME} or ${NAME:-default}; write $$"
            " for a literal $)",
        ),
        (
            "${}",
            "invalid variable reference '${}' (expected ${NAME} or ${NAME:-default}; write $$"
            " for a literal $)",
        ),
        ("abc ${A", "unterminated '${' in 'abc ${A'"),
    ],
)
def test_substitute_problems(text: str, problem: str) -> None:
    assert substitute(text, {})[1] == [problem]


def config_with(**server: object) -> dict[str, Any]:
    return {
        "server": server,
        "pools": {"main": {"backends": ["http://127.0.0.1:9001"]}},
        "routes": [{"name": "all", "pool": "main"}],
    }


def test_whole_expression_is_retyped_for_numeric_fields() -> None:
    assert parse_config(config_with(port="${PORT:-8080}"), {}).server.port == 8080
    assert parse_config(config_with(port="${PORT:-8080}"), {"PORT": "9000"}).server.port == 9000
    drain = parse_config(config_with(drain_timeout_s="${D}"), {"D": "2.5"}).server.drain_timeout_s
    assert drain == 2.5


def test_whole_expression_is_retyped_for_booleans() -> None:
    data = config_with()
    data["admin"] = {"enabled": "${ADMIN:-true}"}
    assert parse_config(data, {}).admin.enabled is True
    assert parse_config(data, {"ADMIN": "false"}).admin.enabled is False


def test_string_fields_keep_the_text() -> None:
    """A token made of digits must stay a string, not become an int."""
    data = config_with()
    data["admin"] = {"token": "${TOKEN}"}
    assert parse_config(data, {"TOKEN": "0123"}).admin.token == "0123"
    assert parse_config(data, {"TOKEN": "true"}).admin.token == "true"


def test_empty_default_gives_no_admin_token() -> None:
    data = config_with()
    data["admin"] = {"token": "${LLMPROXY_ADMIN_TOKEN:-}"}
    assert parse_config(data, {}).admin.token is None


def test_retyped_value_of_wrong_type_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(port="${PORT}"), {"PORT": "http"})
    assert caught.value.errors == ["server.port: expected an integer, got string 'http'"]


def test_partial_expression_stays_a_string() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(port="${PORT}0"), {"PORT": "808"})
    assert caught.value.errors == ["server.port: expected an integer, got string '8080'"]


def test_interpolation_in_lists_and_nested_values() -> None:
    data = config_with()
    data["pools"]["main"]["backends"] = [
        "http://${HOST}:9001",
        {"url": "${URL2}", "name": "${NAME:-second}"},
    ]
    backends = parse_config(data, {"HOST": "10.1.2.3", "URL2": "http://b:1"}).pools["main"].backends
    assert [(b.url, b.name) for b in backends] == [
        ("http://10.1.2.3:9001", "10.1.2.3:9001"),
        ("http://b:1", "second"),
    ]


def test_escape_keeps_literal_dollar() -> None:
    data = config_with()
    data["admin"] = {"token": "pa$$word-$${X}"}
    assert parse_config(data, {"X": "no"}).admin.token == "pa$word-${X}"


def test_missing_variable_names_the_yaml_path_once() -> None:
    data = config_with(port="${PORT}")
    data = {"admin": {"host": "0.0.0.0", "token": "${LLMPROXY_ADMIN_TOKEN}"}, **data}
    data["pools"]["main"]["backends"].append("http://${GPU_HOST}:8000")
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {})
    assert caught.value.errors == [
        "admin.token: environment variable LLMPROXY_ADMIN_TOKEN is not set and has no default",
        "server.port: environment variable PORT is not set and has no default",
        "pools.main.backends[1]: environment variable GPU_HOST is not set and has no default",
    ]


def test_keys_are_not_interpolated() -> None:
    data = config_with()
    data["pools"] = {"${POOL}": {"backends": ["http://a:1"]}}
    data["routes"][0]["pool"] = "${POOL}"
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {"POOL": "main"})
    assert caught.value.errors == ["routes[0].pool: unknown pool 'main' (known: ${POOL})"]


def test_load_config_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {port: '${LLMPROXY_TEST_PORT}'}\n"
        "pools: {main: {backends: [http://127.0.0.1:9001]}}\n"
        "routes: [{name: all, pool: main}]\n"
    )
    monkeypatch.setenv("LLMPROXY_TEST_PORT", "7000")
    assert load_config(path).server.port == 7000
    assert load_config(path, env={"LLMPROXY_TEST_PORT": "7001"}).server.port == 7001


def test_plain_unquoted_expression_in_block_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server:\n"
        "  port: ${PORT:-8080}\n"
        "pools: {main: {backends: [http://127.0.0.1:9001]}}\n"
        "routes: [{name: all, pool: main}]\n"
    )
    assert load_config(path, env={}).server.port == 8080
