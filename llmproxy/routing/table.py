"""The route table: the first route whose every condition holds wins.

Conditions (all optional, all must hold):

- ``model``: an exact name, a glob (``llama-*``, matched case-sensitively as
  :func:`fnmatch.fnmatchcase` does), or ``*`` for any model. ``*`` also
  matches a request that names no model (``GET /v1/models``, TGI's
  ``/generate``): a catch-all route catches all. A route with any other model
  condition never matches a request that names no model.
- ``path_prefix``: a plain ``str.startswith`` test, not segment-aware:
  ``/v1`` also matches ``/v1beta``; write ``/v1/`` to mean the segment.
- ``header``: the header's value equals the given one exactly. The name is
  looked up lower-cased, so ``headers`` must be case-insensitive (aiohttp's
  ``CIMultiDictProxy``) or have lower-cased keys.

Everything is compiled once. Exact model names go into a dict that maps each
name to the routes that could match a request for it (that name's exact routes
merged, in table order, with the routes whose model condition is a glob or
absent), so a lookup tests only those and first-match-wins is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import translate

from llmproxy.config.schema import RouteConfig

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class _Compiled:
    route: RouteConfig
    #: ``None`` when the route has no model condition or it is checked elsewhere
    #: (an exact name, via the dict; ``*``, by the request having a model).
    model_glob: Callable[[str], re.Match[str] | None] | None
    path_prefix: str | None
    header_name: str | None
    header_value: str

    def holds(self, path: str, model: str | None, headers: Mapping[str, str]) -> bool:
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.header_name is not None and headers.get(self.header_name) != self.header_value:
            return False
        return self.model_glob is None or (model is not None and self.model_glob(model) is not None)


def _compile(route: RouteConfig) -> _Compiled:
    pattern = route.match.model
    glob = None
    if pattern is not None and pattern != "*" and _GLOB_CHARS.intersection(pattern):
        glob = re.compile(translate(pattern)).match
    header = route.match.header
    return _Compiled(
        route=route,
        model_glob=glob,
        path_prefix=route.match.path_prefix,
        header_name=header[0].lower() if header is not None else None,
        header_value=header[1] if header is not None else "",
    )


def _is_exact(pattern: str | None) -> bool:
    return pattern is not None and pattern != "*" and not _GLOB_CHARS.intersection(pattern)


class RouteTable:
    """An immutable, compiled list of routes; build a new one on reload."""

    __slots__ = ("_by_model", "_compiled", "_no_model", "_other_model", "_routes")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._routes = tuple(routes)
        self._compiled = tuple(_compile(r) for r in self._routes)
        exact = [_is_exact(r.match.model) for r in self._routes]
        # Routes a request for a model absent from the dict could match:
        # every route but the exact-name ones, in table order.
        self._other_model = tuple(c for c, ex in zip(self._compiled, exact, strict=True) if not ex)
        self._no_model = tuple(c for c in self._compiled if c.route.match.model in (None, "*"))
        self._by_model: dict[str, tuple[_Compiled, ...]] = {}
        for route, ex in zip(self._routes, exact, strict=True):
            name = route.match.model
            if ex and name is not None and name not in self._by_model:
                self._by_model[name] = tuple(
                    c
                    for c, c_ex in zip(self._compiled, exact, strict=True)
                    if not c_ex or c.route.match.model == name
                )

    @property
    def routes(self) -> tuple[RouteConfig, ...]:
        return self._routes

    @property
    def needs_model(self) -> bool:
        """Whether any route has a model condition other than ``*``; if not,
        bodies need no parsing."""
        return len(self._no_model) != len(self._routes)

    def match(self, path: str, model: str | None, headers: Mapping[str, str]) -> RouteConfig | None:
        """The first route, in table order, whose every condition holds; ``None`` if none."""
        if model is None:
            candidates = self._no_model
        else:
            candidates = self._by_model.get(model, self._other_model)
        for c in candidates:
            if c.holds(path, model, headers):
                return c.route
        return None

    def needs_model_for(self, path: str, headers: Mapping[str, str]) -> bool:
        """Whether the match for this path and these headers could depend on the model.

        False when no route with a model condition could match, or when a route
        without one matches before any such route: the caller can then route
        without reading the request body.
        """
        for c in self._compiled:
            if c.path_prefix is not None and not path.startswith(c.path_prefix):
                continue
            if c.header_name is not None and headers.get(c.header_name) != c.header_value:
                continue
            # The first route that can hold decides: the model matters only if it has
            # a model condition other than ``*`` (else it matches whatever the model is).
            return c.route.match.model not in (None, "*")
        return False
