from __future__ import annotations

from llmproxy.upstream.usage import find_usage


def test_non_streamed_body() -> None:
    body = (
        b'{"id":"x","choices":[{"message":{"content":"the usage of words"}}],'
        b'"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7}}'
    )
    assert find_usage(body) == (12, 7)


def test_stream_tail_with_usage_chunk() -> None:
    tail = (
        b'data: {"choices":[],"usage":{"prompt_tokens": 3, "completion_tokens": 9}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert find_usage(tail) == (3, 9)


def test_no_usage() -> None:
    assert find_usage(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n') is None
    assert find_usage(b'{"usage": null}') is None
    assert find_usage(b"") is None


def test_strip_usage_events_hides_the_chunk_the_gateway_asked_for() -> None:
    from llmproxy.upstream.usage import strip_usage_events

    content = b'data: {"choices":[{"delta":{"content":"hi"}}]}'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}'
    chunk = content + b"\n\n" + usage + b"\n\ndata: [DONE]\n\n"
    kept, found = strip_usage_events(chunk)
    assert found == (4, 2)
    assert kept == content + b"\n\ndata: [DONE]\n\n"
    assert strip_usage_events(content + b"\n\n") == (content + b"\n\n", None)


def test_events_split_across_reads_are_held_until_complete() -> None:
    from llmproxy.upstream.attempt import _whole_events

    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    head, tail = usage[:30], usage[30:]
    assert _whole_events(head) == (b"", head)
    events, rest = _whole_events(head + tail + b"data: [DO")
    assert events == usage
    assert rest == b"data: [DO"
