from __future__ import annotations

from multidict import CIMultiDict

from llmproxy.config.schema import RouteConfig, RouteMatch, SplitTarget
from llmproxy.routing import RouteTable

NO_HEADERS: dict[str, str] = {}


def route(
    name: str,
    *,
    model: str | None = None,
    path_prefix: str | None = None,
    header: tuple[str, str] | None = None,
) -> RouteConfig:
    return RouteConfig(
        name=name,
        match=RouteMatch(model=model, path_prefix=path_prefix, header=header),
        split=(SplitTarget(pool=name, weight=1),),
    )


def matched(table: RouteTable, path: str = "/v1/chat/completions", model: str | None = None,
            headers: dict[str, str] | CIMultiDict[str] = NO_HEADERS) -> str | None:  # fmt: skip
    found = table.match(path, model, headers)
    return None if found is None else found.name


def test_first_matching_route_wins() -> None:
    table = RouteTable([route("first", path_prefix="/v1/"), route("second", path_prefix="/v1/")])
    assert matched(table) == "first"


def test_empty_match_matches_everything_and_no_match_is_none() -> None:
    assert matched(RouteTable([route("any")]), path="/whatever") == "any"
    assert matched(RouteTable([route("chat", model="llama")]), model="mistral") is None
    assert matched(RouteTable([])) is None


def test_exact_model() -> None:
    table = RouteTable([route("llama", model="llama-3-8b"), route("rest")])
    assert matched(table, model="llama-3-8b") == "llama"
    assert matched(table, model="llama-3-8b-instruct") == "rest"
    assert matched(table, model="LLAMA-3-8B") == "rest"  # case-sensitive


def test_glob_model() -> None:
    table = RouteTable([route("llama", model="llama-*"), route("q", model="qwen-?b")])
    assert matched(table, model="llama-3-70b") == "llama"
    assert matched(table, model="qwen-7b") == "q"
    assert matched(table, model="qwen-14b") is None
    assert matched(table, model="Llama-3") is None  # fnmatchcase: case-sensitive


def test_star_matches_any_model_and_a_missing_one() -> None:
    table = RouteTable([route("models", model="*"), route("fallback")])
    assert matched(table, model="anything") == "models"
    assert matched(table, model="") == "models"
    assert matched(table, model=None) == "models"


def test_a_request_without_model_skips_every_named_model_route() -> None:
    table = RouteTable([route("exact", model="m"), route("glob", model="m*")])
    assert matched(table, model=None) is None
    table = RouteTable(
        [route("exact", model="m"), route("glob", model="m*"), route("star", model="*")]
    )
    assert matched(table, model=None) == "star"


def test_exact_fast_path_keeps_table_order() -> None:
    glob_first = RouteTable([route("glob", model="llama-*"), route("exact", model="llama-3")])
    assert matched(glob_first, model="llama-3") == "glob"
    exact_first = RouteTable([route("exact", model="llama-3"), route("glob", model="llama-*")])
    assert matched(exact_first, model="llama-3") == "exact"
    # A route without a model condition before an exact one also wins first.
    open_first = RouteTable([route("open", path_prefix="/v1/"), route("exact", model="llama-3")])
    assert matched(open_first, model="llama-3") == "open"
    assert matched(open_first, path="/generate", model="llama-3") == "exact"


def test_duplicate_exact_names_fall_through_in_order() -> None:
    table = RouteTable(
        [
            route("beta", model="m", header=("x-beta", "1")),
            route("other", model="n"),
            route("plain", model="m"),
        ]
    )
    assert matched(table, model="m", headers={"x-beta": "1"}) == "beta"
    assert matched(table, model="m") == "plain"


def test_path_prefix_is_a_plain_string_prefix() -> None:
    table = RouteTable([route("v1", path_prefix="/v1"), route("seg", path_prefix="/generate/")])
    assert matched(table, path="/v1/completions") == "v1"
    assert matched(table, path="/v1beta/x") == "v1"  # documented: not segment-aware
    assert matched(table, path="/generate") is None
    assert matched(table, path="/generate/stream") == "seg"


def test_header_is_matched_exactly_by_lower_cased_name() -> None:
    table = RouteTable([route("canary", header=("X-Canary", "yes")), route("rest")])
    assert matched(table, headers=CIMultiDict({"X-CANARY": "yes"})) == "canary"
    assert matched(table, headers={"x-canary": "yes"}) == "canary"
    assert matched(table, headers=CIMultiDict({"X-Canary": "Yes"})) == "rest"
    assert matched(table) == "rest"


def test_all_conditions_must_hold() -> None:
    table = RouteTable(
        [
            route("all", model="llama-*", path_prefix="/v1/", header=("x-tier", "gold")),
            route("rest"),
        ]
    )
    gold = {"x-tier": "gold"}
    assert matched(table, model="llama-3", headers=gold) == "all"
    assert matched(table, model="mistral", headers=gold) == "rest"
    assert matched(table, path="/generate", model="llama-3", headers=gold) == "rest"
    assert matched(table, model="llama-3", headers={"x-tier": "silver"}) == "rest"
    assert matched(table, model=None, headers=gold) == "rest"


def test_needs_model() -> None:
    assert not RouteTable([route("a", path_prefix="/v1/"), route("b")]).needs_model
    assert not RouteTable([route("a"), route("b", model="*")]).needs_model
    assert RouteTable([route("a", model="m"), route("b", model="*")]).needs_model
    assert not RouteTable([]).needs_model


def test_needs_model_for_a_path() -> None:
    table = RouteTable(
        [
            route("admin", path_prefix="/internal/"),
            route("llama", path_prefix="/v1/", model="llama-*"),
            route("tgi", path_prefix="/generate"),
            route("canary", header=("x-canary", "1"), model="canary-*"),
            route("rest"),
        ]
    )
    assert not table.needs_model_for("/internal/x", NO_HEADERS)
    assert table.needs_model_for("/v1/chat/completions", NO_HEADERS)
    assert not table.needs_model_for("/generate_stream", NO_HEADERS)
    assert not table.needs_model_for("/other", NO_HEADERS)
    assert table.needs_model_for("/other", {"x-canary": "1"})
    assert not RouteTable([]).needs_model_for("/v1/", NO_HEADERS)
