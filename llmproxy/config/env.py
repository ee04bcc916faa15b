"""``${VAR}`` / ``${VAR:-default}`` interpolation of the parsed YAML tree.

Interpolation runs on the parsed tree, not on the file text, so a value read
from the environment can never change the structure of the document, and an
unset variable is reported with the YAML path that needs it.

A scalar that is exactly one ``${...}`` expression becomes an
:class:`EnvScalar`: the field it fills decides its type. A numeric or boolean
field takes the text re-read by YAML's plain-scalar rules (``"8080"`` is
8080, ``"true"`` is true, empty is null); a string field takes the text
as-is, so a token made only of digits stays a string. This holds whether or
not the scalar was quoted, which matters because inside a flow collection
(``{...}`` or ``[...]``) YAML only accepts ``${...}`` when quoted.

``$$`` is a literal ``$``; a ``$`` not followed by ``$`` or ``{`` is kept.
Defaults are used when the variable is unset *or empty*, as in the shell, and
are not themselves interpolated. Mapping keys are never interpolated.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from llmproxy.config.errors import Issues, index_path, key_path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHOLE = re.compile(r"\$\{[^}]*\}")


class Unresolved(enum.Enum):
    """Stands in for a value whose interpolation failed and was already reported."""

    VALUE = "unresolved"


UNRESOLVED = Unresolved.VALUE


@dataclass(frozen=True, slots=True)
class EnvScalar:
    """A scalar that was one whole ``${...}`` expression."""

    #: The text after substitution; what a string field receives.
    text: str
    #: ``text`` read as a YAML plain scalar; what any other field receives.
    value: object


def interpolate(data: object, env: Mapping[str, str], path: str, issues: Issues) -> object:
    """Return a copy of ``data`` with every string value interpolated."""
    if isinstance(data, str):
        return _interpolate_str(data, env, path, issues)
    if isinstance(data, dict):
        return {
            key: interpolate(value, env, key_path(path, str(key)), issues)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [interpolate(item, env, index_path(path, i), issues) for i, item in enumerate(data)]
    return data


def _interpolate_str(
    text: str, env: Mapping[str, str], path: str, issues: Issues
) -> str | EnvScalar | Unresolved:
    if "$" not in text:
        return text
    result, problems = substitute(text, env)
    if problems:
        for problem in problems:
            issues.add(path, problem)
        return UNRESOLVED
    if _WHOLE.fullmatch(text):
        return EnvScalar(result, _read_plain_scalar(result))
    return result


def substitute(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand ``text``; return the result and the problems found (empty when none)."""
    out: list[str] = []
    problems: list[str] = []
    i = 0
    while (start := text.find("$", i)) >= 0:
        out.append(text[i:start])
        following = text[start + 1 : start + 2]
        if following != "{":
            # "$$" is an escaped "$"; a lone "$" is kept as written.
            out.append("$")
            i = start + (2 if following == "$" else 1)
            continue
        end = text.find("}", start + 2)
        if end < 0:
            problems.append(f"unterminated '${{' in {text!r}")
            return text, problems
        body = text[start + 2 : end]
        name, has_default, default = body.partition(":-")
        if not _NAME.fullmatch(name):
            problems.append(
                f"invalid variable reference '${{{body}}}'"
                " (expected ${NAME} or ${NAME:-default}; write $$ for a literal $)"
            )
        else:
            value = env.get(name)
            if has_default and not value:
                value = default
            if value is None:
                problems.append(f"environment variable {name} is not set and has no default")
            else:
                out.append(value)
        i = end + 1
    out.append(text[i:])
    return "".join(out), problems


def _read_plain_scalar(text: str) -> object:
    """Type ``text`` exactly as YAML would type it written unquoted in the file."""
    resolver = yaml.resolver.Resolver()
    tag: str = resolver.resolve(  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        yaml.ScalarNode, text, (True, False)
    )
    constructor = yaml.constructor.SafeConstructor()
    try:
        return constructor.construct_object(yaml.ScalarNode(tag, text), deep=True)
    except (yaml.YAMLError, ValueError):
        return text
