"""Routes: what they match, how they split traffic, where they fall back to.

References to pools are checked against the names declared under ``pools:``
(even a pool that has errors of its own), so one misspelt pool produces one
message, not a cascade. A route's ``canary`` names two pools of its split (as
written, so a split entry with a problem of its own is not reported again).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from llmproxy.config.env import EnvScalar
from llmproxy.config.errors import Issues, index_path, key_path
from llmproxy.config.fields import (
    INVALID,
    Invalid,
    apply_fields,
    check_keys,
    is_null,
    read_list,
    read_mapping,
    read_number,
    read_str,
    read_weight,
    require,
)
from llmproxy.config.schema import CanaryConfig, RouteConfig, RouteMatch, SplitTarget
from llmproxy.config.values import (
    STICKY_MODES,
    Problem,
    header_name_problem,
    name_problem,
    parse_key_mode,
)

_ROUTE_KEYS = ("name", "match", "split", "pool", "sticky", "fallback", "canary")
_MATCH_KEYS = ("model", "path_prefix", "header")
_SPLIT_KEYS = ("pool", "weight")
_CANARY_POOLS = ("canary_pool", "stable_pool")


def build_routes(value: object, pools: Collection[str], issues: Issues) -> tuple[RouteConfig, ...]:
    if isinstance(value, Invalid):
        return ()
    items = read_list(value, "routes", issues)
    if items is None:
        return ()
    if not items:
        issues.add("routes", "must define at least one route")
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        path = index_path("routes", i)
        route = _build_route(item, path, pools, issues)
        if route is None:
            continue
        if route.name in names:
            first = index_path("routes", names[route.name])
            message = f"duplicate route name {route.name!r} (also {first})"
            issues.add(key_path(path, "name"), message)
        names.setdefault(route.name, i)
        routes.append(route)
    return tuple(routes)


def _build_route(
    item: object, path: str, pools: Collection[str], issues: Issues
) -> RouteConfig | None:
    data = read_mapping(item, path, issues)
    if data is None:
        return None
    check_keys(data, _ROUTE_KEYS, path, issues)
    name = _read_name(require(data, "name", path, issues), key_path(path, "name"), issues)
    match = _build_match(data.get("match"), key_path(path, "match"), issues)
    split = _build_split(data, path, pools, issues)
    sticky = "none"
    if "sticky" in data:
        sticky_path = key_path(path, "sticky")
        text = read_str(data["sticky"], sticky_path, issues)
        mode = parse_key_mode(text, STICKY_MODES, "sticky mode") if isinstance(text, str) else None
        if isinstance(mode, Problem):
            issues.add(sticky_path, mode.message)
        elif mode is not None:
            sticky = mode
    fallback = _build_fallback(data.get("fallback"), key_path(path, "fallback"), pools, issues)
    canary = None
    if not is_null(data.get("canary")):
        canary_path = key_path(path, "canary")
        canary = _build_canary(data["canary"], canary_path, _written_split(data), issues)
    if name is None:
        return None
    return RouteConfig(
        name=name, match=match, split=split, sticky=sticky, fallback=fallback, canary=canary
    )


def _read_name(value: object, path: str, issues: Issues) -> str | None:
    if isinstance(value, Invalid):
        return None
    name = read_str(value, path, issues)
    if isinstance(name, Invalid):
        return None
    problem = name_problem(name)
    if problem is not None:
        issues.add(path, f"route name {problem}")
        return None
    return name


def _build_match(value: object, path: str, issues: Issues) -> RouteMatch:
    if is_null(value):
        return RouteMatch()
    data = read_mapping(value, path, issues)
    if data is None:
        return RouteMatch()
    check_keys(data, _MATCH_KEYS, path, issues)
    model: str | None = None
    if "model" in data:
        text = read_str(data["model"], key_path(path, "model"), issues)
        model = text if isinstance(text, str) else None
    prefix: str | None = None
    if "path_prefix" in data:
        prefix_path = key_path(path, "path_prefix")
        text = read_str(data["path_prefix"], prefix_path, issues)
        if isinstance(text, str) and not text.startswith("/"):
            issues.add(prefix_path, f"must start with '/', got {text!r}")
        elif isinstance(text, str):
            prefix = text
    header = None
    if "header" in data:
        header = _build_header(data["header"], key_path(path, "header"), issues)
    return RouteMatch(model=model, path_prefix=prefix, header=header)


def _build_header(value: object, path: str, issues: Issues) -> tuple[str, str] | None:
    """``{x-tenant: acme}`` → ``("x-tenant", "acme")``: one header, exact value."""
    data = read_mapping(value, path, issues)
    if data is None:
        return None
    if len(data) != 1:
        issues.add(path, f"expected one header as {{name: value}}, got {len(data)} entries")
        return None
    ((name, raw),) = data.items()
    problem = header_name_problem(name)
    if problem is not None:
        issues.add(path, problem)
        return None
    text = read_str(raw, key_path(path, name), issues, non_empty=False)
    return (name.lower(), text) if isinstance(text, str) else None


def _build_split(
    data: Mapping[str, object], path: str, pools: Collection[str], issues: Issues
) -> tuple[SplitTarget, ...]:
    """``split: [{pool, weight}, ...]``, or the shorthand ``pool: NAME`` (weight 1)."""
    if "split" in data and "pool" in data:
        issues.add(path, "give either 'split' or 'pool', not both")
        return ()
    if "pool" in data:
        pool_path = key_path(path, "pool")
        pool = _read_pool_ref(data["pool"], pool_path, pools, issues)
        return (SplitTarget(pool=pool, weight=1.0),) if pool is not None else ()
    if "split" not in data:
        issues.add(path, "needs 'split' (a list of {pool, weight}) or 'pool' (one pool name)")
        return ()
    split_path = key_path(path, "split")
    items = read_list(data["split"], split_path, issues)
    if items is None:
        return ()
    if not items:
        issues.add(split_path, "must list at least one {pool, weight}")
    targets: list[SplitTarget] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        item_path = index_path(split_path, i)
        target = read_mapping(item, item_path, issues)
        if target is None:
            continue
        check_keys(target, _SPLIT_KEYS, item_path, issues)
        pool_path = key_path(item_path, "pool")
        pool_value = require(target, "pool", item_path, issues)
        pool = _read_pool_ref(pool_value, pool_path, pools, issues)
        weight_value = require(target, "weight", item_path, issues)
        weight = read_weight(weight_value, key_path(item_path, "weight"), issues)
        if pool is not None and pool in seen:
            first = index_path("split", seen[pool])
            issues.add(pool_path, f"pool {pool!r} is already in the split (at {first})")
        elif pool is not None and not isinstance(weight, Invalid):
            seen[pool] = i
            targets.append(SplitTarget(pool=pool, weight=float(weight)))
    return tuple(targets)


def _build_fallback(
    value: object, path: str, pools: Collection[str], issues: Issues
) -> tuple[str, ...]:
    if is_null(value):
        return ()
    items = read_list(value, path, issues)
    if items is None:
        return ()
    fallback: list[str] = []
    for i, item in enumerate(items):
        item_path = index_path(path, i)
        pool = _read_pool_ref(item, item_path, pools, issues)
        if pool is not None and pool in fallback:
            issues.add(item_path, f"pool {pool!r} is listed twice")
        elif pool is not None:
            fallback.append(pool)
    return tuple(fallback)


def _read_pool_ref(value: object, path: str, pools: Collection[str], issues: Issues) -> str | None:
    if isinstance(value, Invalid):
        return None
    name = read_str(value, path, issues)
    if isinstance(name, Invalid):
        return None
    if pools and name not in pools:
        issues.add(path, f"unknown pool {name!r} (known: {', '.join(sorted(pools))})")
        return None
    return name


def _build_canary(
    value: object, path: str, split_pools: list[str], issues: Issues
) -> CanaryConfig | None:
    """``{canary_pool, stable_pool, steps?, ...}``; ``None`` when a pool name is unusable."""
    # policy.canary imports the config package, so it cannot be imported at the top.
    from llmproxy.policy.canary import canary_problems  # noqa: PLC0415

    data = read_mapping(value, path, issues)
    if data is None:
        return None
    names = {
        key: read_str(require(data, key, path, issues), key_path(path, key), issues)
        for key in _CANARY_POOLS
    }
    steps = _read_steps(data.get("steps"), key_path(path, "steps"), issues)
    rest = {k: v for k, v in data.items() if k not in (*_CANARY_POOLS, "steps")}
    base = CanaryConfig(canary_pool="", stable_pool="")
    canary = apply_fields(CanaryConfig, rest, path, issues, base)
    canary_pool, stable_pool = names["canary_pool"], names["stable_pool"]
    if isinstance(canary_pool, Invalid) or isinstance(stable_pool, Invalid):
        return None
    canary = replace(
        canary,
        canary_pool=canary_pool,
        stable_pool=stable_pool,
        steps=() if isinstance(steps, Invalid) else steps,
    )
    for key, message in canary_problems(canary, split_pools):
        issues.add(key_path(path, key), message)
    return canary


def _read_steps(value: object, path: str, issues: Issues) -> tuple[float, ...] | Invalid:
    """Canary weights in percent: each in (0, 100], rising strictly."""
    if is_null(value):
        return ()
    items = read_list(value, path, issues)
    if items is None:
        return INVALID
    steps: list[float] = []
    valid = True
    for i, item in enumerate(items):
        item_path = index_path(path, i)
        step = read_number(item, item_path, issues, integer=False)
        if isinstance(step, Invalid):
            valid = False
        elif not 0 < step <= 100:
            issues.add(item_path, f"must be a percentage in (0, 100], got {step:g}")
            valid = False
        elif steps and step <= steps[-1]:
            message = f"must be greater than the step before ({steps[-1]:g}), got {step:g}"
            issues.add(item_path, message)
            valid = False
        else:
            steps.append(float(step))
    return tuple(steps) if valid else INVALID


def _written_split(data: Mapping[str, object]) -> list[str]:
    """The pool names of a route's split as written, whether or not they are valid."""
    written = [data.get("pool")]
    split = data.get("split")
    if isinstance(split, list):
        written += [item.get("pool") for item in split if isinstance(item, dict)]
    names = [item.text if isinstance(item, EnvScalar) else item for item in written]
    return [name for name in names if isinstance(name, str)]
