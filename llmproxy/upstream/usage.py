"""Token usage read from the tail of a response, without parsing the body.

OpenAI-compatible servers put ``usage`` at the end: the last key of a
non-streamed body, the last data event before ``[DONE]`` of a stream that
asked for it (``stream_options.include_usage``). A regex over the last bytes
costs far less than decoding the JSON of every response.
"""

from __future__ import annotations

import re

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')

#: How many bytes after ``"usage"`` may hold its fields.
_WINDOW = 400


def find_usage(tail: bytes) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` from the last ``usage`` object in
    ``tail``, or ``None`` if it has none."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    window = tail[at : at + _WINDOW]
    prompt = _PROMPT.search(window)
    completion = _COMPLETION.search(window)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)), int(completion.group(1))


def strip_usage_events(chunk: bytes) -> tuple[bytes, tuple[int, int] | None]:
    """Remove usage-only SSE events (``"choices": []`` plus ``usage``) from a
    chunk; return what is left and the usage they held.

    Used when the gateway asked the replica for usage (to settle a token
    budget) on behalf of a client that did not: the client must not see an
    event it did not ask for (SDK code often reads ``choices[0]``).
    """
    found = None
    kept = []
    for event in chunk.split(b"\n\n"):
        if b'"usage"' in event and _CHOICES_EMPTY.search(event):
            found = find_usage(event) or found
            continue
        kept.append(event)
    return b"\n\n".join(kept), found


_CHOICES_EMPTY = re.compile(rb'"choices"\s*:\s*\[\s*\]')
