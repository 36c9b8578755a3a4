"""A conversation as Markdown (to read or share) or JSON (to process)."""

from __future__ import annotations

import json
from dataclasses import asdict

from .recording import CUT_BY
from .store import Conversation

_HEADINGS = {"user": "You", "assistant": "Assistant", "system": "System prompt"}


def to_markdown(conversation: Conversation) -> str:
    summary = conversation.summary
    lines = [f"# {summary.title or 'Untitled conversation'}", ""]
    lines.append(
        f"*{summary.created_at[:16].replace('T', ' ')} UTC · {summary.model or 'no model'}*"
    )
    for message in conversation.messages:
        heading = _HEADINGS[message.role]
        if message.role == "assistant" and message.model:
            heading += f" ({message.model})"
        if message.status == "length":
            reason = CUT_BY.get(message.finish_reason or "")
            heading += f" — cut: {reason}" if reason else " — cut"
        elif message.status != "complete":
            heading += f" — {message.status}"
        lines += ["", f"## {heading}", "", message.content.rstrip()]
    return "\n".join(lines) + "\n"


def to_json(conversation: Conversation) -> str:
    data = asdict(conversation.summary)
    data["messages"] = [asdict(message) for message in conversation.messages]
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"
