"""The configuration error and the collector that feeds it.

Validation keeps going after the first problem so that one run of
``llmproxy check-config`` shows everything wrong with a file; every message
starts with the YAML path of the value it is about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """A configuration that cannot be used; ``errors`` holds every problem found."""

    def __init__(self, errors: Iterable[str], source: str | None = None) -> None:
        self.errors: list[str] = list(errors)
        #: The file the configuration came from, when there was one.
        self.source = source
        super().__init__("\n".join(self.errors))


class Issues:
    """Collects messages for one load; a fresh instance per load, never shared."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.messages.append(f"{path or '(top level)'}: {message}")

    def __bool__(self) -> bool:
        return bool(self.messages)


def key_path(path: str, key: str) -> str:
    """``pools.main``; keys that would read ambiguously are quoted: ``pools["a.b"]``."""
    if not _PLAIN_KEY.fullmatch(key):
        escaped = key.replace("\\", "\\\\").replace('"', '\\"')
        return f'{path}["{escaped}"]'
    return f"{path}.{key}" if path else key


def index_path(path: str, index: int) -> str:
    return f"{path}[{index}]"
