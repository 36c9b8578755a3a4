"""A conversation as Markdown (its active path, to read or share), JSON (every branch, to
process) or an outline of its tree (to find a branch)."""

from __future__ import annotations

import json
from dataclasses import asdict

from .recording import CUT_BY
from .store import Conversation, StoredMessage

_HEADINGS = {"user": "You", "assistant": "Assistant", "system": "System prompt"}
OUTLINE_WIDTH = 60  # of a message's first line in the outline


def to_markdown(conversation: Conversation) -> str:
    summary = conversation.summary
    lines = [f"# {summary.title or 'Untitled conversation'}", ""]
    lines.append(
        f"*{summary.created_at[:16].replace('T', ' ')} UTC · {summary.model or 'no model'}*"
    )
    if own := conversation.settings.described():
        lines.append(f"*Its own settings: {own}*")
    for message in conversation.messages:
        heading = _HEADINGS[message.role]
        if message.role == "assistant" and message.model:
            heading += f" ({message.model})"
        if status := _status(message):
            heading += f" — {status}"
        lines += ["", f"## {heading}", "", message.content.rstrip()]
    return "\n".join(lines) + "\n"


def to_json(conversation: Conversation) -> str:
    """Every message of every branch, oldest first, each with its parent_id; `active_path`
    lists the ids of those the model sees, first to `active_leaf`."""
    data = asdict(conversation.summary)
    data["settings"] = conversation.settings.chosen()
    data["active_leaf"] = conversation.active_leaf
    data["active_path"] = [message.id for message in conversation.messages]
    data["messages"] = [asdict(message) for message in conversation.tree]
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def to_outline(conversation: Conversation) -> str:
    """The tree, a message a line (id, role, first line), `*` before those on the active path.
    A message with one reply is followed by it at the same depth; where there are several
    (regenerated, edited), each branch is drawn below it."""
    on_path = {message.id for message in conversation.messages}
    title = conversation.summary.title or "Untitled conversation"
    lines = [f"conversation {conversation.id}: {title} (* marks the active path)"]
    # A stack, not recursion: a conversation may be thousands of messages deep.
    pending = _branches(conversation.children(None), "")
    while pending:
        message, lead, rest = pending.pop()
        mark = "*" if message.id in on_path else " "
        status = f" ({status})" if (status := _status(message)) else ""
        lines.append(f"{mark} {lead}{message.id} {message.role}{status}: {_first_line(message)}")
        pending += _branches(conversation.children(message.id), rest)
    return "\n".join(lines) + "\n"


def _branches(
    children: tuple[StoredMessage, ...], indent: str
) -> list[tuple[StoredMessage, str, str]]:
    """Each child with the lead of its line and the indent of what follows it, last child
    first (they are popped)."""
    if len(children) == 1:
        return [(children[0], indent, indent)]
    last = len(children) - 1
    return [
        (child, indent + ("└─ " if i == last else "├─ "), indent + ("   " if i == last else "│  "))
        for i, child in reversed(list(enumerate(children)))
    ]


def _status(message: StoredMessage) -> str:
    """How a message that did not end by itself ended ("" for one that did)."""
    if message.status == "length":
        reason = CUT_BY.get(message.finish_reason or "")
        return f"cut: {reason}" if reason else "cut"
    return "" if message.status == "complete" else message.status


def _first_line(message: StoredMessage) -> str:
    line = next((line.strip() for line in message.content.splitlines() if line.strip()), "")
    if not line:
        return "(empty)"
    return line if len(line) <= OUTLINE_WIDTH else line[: OUTLINE_WIDTH - 1] + "…"
