"""Server-sent events: each chunk one line, whatever characters its text holds."""

from __future__ import annotations

import json

from llamachat.server.app import sse_data


def test_an_event_stays_one_line_for_every_reader_whatever_the_text():
    text = "a\u2028b\x85c\u2029d\ne\r天"
    event = sse_data({"choices": [{"delta": {"content": text}}]}).decode()
    assert event.endswith("\n\n")
    lines = event.removesuffix("\n\n").splitlines()  # a reader splitting on every line break
    assert lines == [lines[0]] and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == text
    assert "天" in lines[0]  # UTF-8 as it is, not escaped
