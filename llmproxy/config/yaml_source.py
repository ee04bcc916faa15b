"""Reading a configuration file into plain YAML data, or a clear ConfigError.

A missing file, bad UTF-8 or a YAML syntax error each become one message that
names the file (and line and column for YAML), never a traceback. Duplicate
mapping keys are errors too: YAML would otherwise keep the last one silently,
and two pools or two sections with one name are always a mistake.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llmproxy.config.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys instead of keeping the last value."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        #: ``(line, column, message)``: sorted before reporting, since
        #: mappings are checked outermost first, not in document order.
        self.duplicates: list[tuple[int, int, str]] = []
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # The first call on a node sees its keys as written; later calls (a
        # node merged into several others) see merged keys, which may repeat.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._check_duplicates(node)
        super().flatten_mapping(node)

    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        first_seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = (key_node.tag, str(key_node.value))
            first = first_seen.setdefault(key, key_node)
            if first is not key_node:
                mark = key_node.start_mark
                first_at = _where(first.start_mark)
                message = f"{_where(mark)}: duplicate key {key[1]!r} (first at {first_at})"
                self.duplicates.append((mark.line, mark.column, message))


def read_yaml_file(path: str) -> object:
    """The parsed content of ``path``; raises :class:`ConfigError` on any failure."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"], path) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a file"], path) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"], path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8 (byte {exc.start})"], path) from None
    return parse_yaml(text, path)


def parse_yaml(text: str, source: str) -> object:
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_describe_yaml_error(exc, text, source)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"], source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        messages = [f"{source}: {message}" for _, _, message in sorted(loader.duplicates)]
        raise ConfigError(messages, source)
    if data is None:
        raise ConfigError([f"{source}: the file is empty"], source)
    return data


def _where(mark: yaml.Mark | None) -> str:
    if mark is None:
        return "unknown position"
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _describe_yaml_error(exc: yaml.MarkedYAMLError, text: str, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    message = f"{source}: invalid YAML at {_where(mark)}: {exc.problem or exc.context}"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} at {_where(exc.context_mark)})"
    return message + _hint(exc, mark, text)


def _hint(exc: yaml.MarkedYAMLError, mark: yaml.Mark | None, text: str) -> str:
    """Point at the two mistakes config files make most: ``*`` and ``${...}`` unquoted."""
    context, problem = exc.context or "", exc.problem or ""
    if "alias" in context or problem.startswith("found undefined alias"):
        return "; a value starting with '*' must be quoted, e.g. model: \"*\""
    lines = text.splitlines()
    line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    if "flow" in context and "${" in line:
        return '; inside {...} or [...] a ${VAR} must be quoted: "${VAR}"'
    return ""
