"""Conversations on disk: every write is one transaction, every thread has its own connection.

A conversation is a tree of messages: each follows its parent, and a regenerated reply or an
edited question is a sibling of the one it replaces, so nothing is lost. One path, from a first
message to the conversation's active leaf, is what the model sees (`Conversation.messages`);
a message added goes after the active leaf and becomes it. Opening another branch
(`activate`) resumes it where it was left: at the message of that branch that was most recently
the active leaf, else at its newest.

A system prompt is a message of role "system" on the path, so a change shows where it happened
and applies from the next turn; the model sees the latest one on its path. A reply is written
while it streams (status "streaming", with the writer's pid and start time); one whose writer
died is marked "interrupted" the next time the history is opened. A finished reply is
"complete", "length" (cut by the token limit or the full context: `finish_reason` says which),
"interrupted" (stopped) or "error".
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from ..processes import own_start, process_running
from .conversation_settings import ConversationSettings
from .db import HistoryError, connect, describe

TITLE_LENGTH = 60
SAVE_INTERVAL_S = 0.5  # a streaming reply reaches the disk at least this often
_ID_RANGE = (-(2**63), 2**63 - 1)  # SQLite's integers
# The ids of a message (the ?) and of every message after it on its branches.
_SUBTREE = """
    WITH RECURSIVE subtree(id) AS (
        VALUES (?) UNION ALL SELECT m.id FROM messages m JOIN subtree s ON m.parent_id = s.id
    )
"""


@dataclass(frozen=True)
class StoredMessage:
    """One message of a conversation as the history keeps it; a reply has its figures too."""

    id: int
    parent_id: int | None  # the message it follows; None for one that begins the conversation
    role: str
    content: str
    model: str | None
    status: str
    created_at: str
    prompt_tokens: int | None = None
    reused_tokens: int | None = None
    generated_tokens: int | None = None
    time_to_first_token_ms: float | None = None
    tokens_per_s: float | None = None
    finish_reason: str | None = None  # the backend's: stop, length, context, cancelled


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    model: str | None
    created_at: str
    updated_at: str
    message_count: int


@dataclass(frozen=True)
class Siblings:
    """A message among those that follow the same message (itself included), oldest first:
    `ids[index]` is the message, so a ‹2/3› marker reads index + 1 of count."""

    ids: tuple[int, ...]
    index: int

    @property
    def count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Conversation:
    """`messages` is the active path, first message to `active_leaf`: what the model sees.
    `tree` is every message on every branch, oldest first, each with its parent_id."""

    summary: ConversationSummary
    messages: tuple[StoredMessage, ...]
    tree: tuple[StoredMessage, ...]
    active_leaf: int | None
    settings: ConversationSettings = ConversationSettings()  # its own, chosen for it

    @property
    def id(self) -> int:
        return self.summary.id

    def children(self, message_id: int | None) -> tuple[StoredMessage, ...]:
        """The messages that follow `message_id` (None: those that begin it), oldest first."""
        return self._children.get(message_id, ())

    def siblings(self, message_id: int) -> Siblings:
        """Where `message_id` (any message of the tree) stands among its parent's children."""
        parent = self._by_id[message_id].parent_id
        ids = tuple(m.id for m in self.children(parent))
        return Siblings(ids, ids.index(message_id))

    @cached_property
    def _by_id(self) -> dict[int, StoredMessage]:
        return {m.id: m for m in self.tree}

    @cached_property
    def _children(self) -> dict[int | None, tuple[StoredMessage, ...]]:
        children: dict[int | None, list[StoredMessage]] = {}
        for message in self.tree:
            children.setdefault(message.parent_id, []).append(message)
        return {parent: tuple(found) for parent, found in children.items()}

    @property
    def system_prompt(self) -> str | None:
        for message in reversed(self.messages):
            if message.role == "system":
                return message.content or None
        return None

    def chat_messages(self) -> list[dict[str, str]]:
        """What the model sees: the latest system prompt, then the turns in order."""
        turns = [
            {"role": m.role, "content": m.content} for m in self.messages if m.role != "system"
        ]
        system = self.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + turns


@dataclass(frozen=True)
class SearchHit:
    conversation_id: int
    title: str
    message_id: int
    role: str
    snippet: str
    active: bool  # on the active path; else on another branch, which activate(message_id) opens


@dataclass(frozen=True)
class MessageStats:
    """The figures kept with a reply: what the backend measured, in the history's units."""

    prompt_tokens: int
    reused_tokens: int
    generated_tokens: int
    time_to_first_token_ms: float
    tokens_per_s: float
    finish_reason: str | None = None  # the backend's: stop, length, context, cancelled


class HistoryStore:
    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self.recover()

    @property
    def _db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = connect(self.path)
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write; a failure to write (a full disk) is a HistoryError that says why."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            reason = describe(error, self.path)
            raise HistoryError(
                f"cannot save to the history at {self.path}: {reason}", reason
            ) from None

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """Reads that must agree (a conversation's active leaf and its messages) in one read
        transaction: another process's write cannot fall between them."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    # Conversations

    def create(
        self, model: str | None = None, system_prompt: str | None = None, title: str = ""
    ) -> int:
        now = _now()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, model, created_at, updated_at) "
                "VALUES (?, ?, ?, ?)",
                (title, model, now, now),
            )
            conversation_id = cursor.lastrowid
            if system_prompt:
                _append(db, conversation_id, "system", system_prompt, None, "complete")
        return conversation_id

    def conversations(self) -> list[ConversationSummary]:
        """Newest first."""
        rows = self._db.execute(
            """
            SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)
                AS message_count
            FROM conversations c ORDER BY c.updated_at DESC, c.id DESC
            """
        ).fetchall()
        return [_summary(row) for row in rows]

    def latest(self) -> ConversationSummary | None:
        conversations = self.conversations()
        return conversations[0] if conversations else None

    def get(self, conversation_id: int) -> Conversation:
        _check_id(conversation_id)
        with self._snapshot() as db:
            row = db.execute(
                """
                SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)
                    AS message_count
                FROM conversations c WHERE c.id = ?
                """,
                (conversation_id,),
            ).fetchone()
            if row is None:
                raise KeyError(conversation_id)
            tree = tuple(
                _message(m)
                for m in db.execute(
                    "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                    (conversation_id,),
                )
            )
        by_id = {m.id: m for m in tree}
        path: list[StoredMessage] = []
        step = by_id.get(row["active_leaf"])
        while step is not None and len(path) < len(tree):  # a parent's id is always smaller
            path.append(step)
            step = by_id.get(step.parent_id)
        settings = ConversationSettings.from_json(row["settings"])
        return Conversation(
            _summary(row), tuple(reversed(path)), tree, row["active_leaf"], settings
        )

    def exists(self, conversation_id: int) -> bool:
        _check_id(conversation_id)
        found = self._db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,))
        return found.fetchone() is not None

    def rename(self, conversation_id: int, title: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title.strip(), conversation_id)
            )

    def set_settings(self, conversation_id: int, settings: ConversationSettings) -> None:
        """Replace a conversation's own settings (every field: None ones are unset)."""
        _check_id(conversation_id)
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE conversations SET settings = ?, updated_at = ? WHERE id = ?",
                (settings.to_json(), _now(), conversation_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(conversation_id)

    def set_model(self, conversation_id: int, model: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE conversations SET model = ? WHERE id = ?", (model, conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # Messages

    def add_message(
        self, conversation_id: int, role: str, content: str, model: str | None = None
    ) -> int:
        """Add a message after the active leaf; it becomes the active leaf."""
        with self._transaction() as db:
            message_id = _append(db, conversation_id, role, content, model, "complete")
            if role == "user":
                db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                    (_title(content), conversation_id),
                )
        return message_id

    def set_system_prompt(self, conversation_id: int, prompt: str) -> int:
        """Record a change of system prompt; it applies from the next turn."""
        return self.add_message(conversation_id, "system", prompt)

    def start_reply(self, conversation_id: int, model: str | None) -> int:
        with self._transaction() as db:
            return _append(db, conversation_id, "assistant", "", model, "streaming")

    def reopen_reply(self, message_id: int) -> str:
        """Open a finished reply to be continued: written to again, by this process (status
        "streaming" as when it began, its figures cleared till it ends again), and the active
        leaf, as a continuation goes on from it; returns the text it had. KeyError if it is not
        a reply; HistoryError if it is streaming still (another writer's)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT conversation_id, role, status, content FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            if row is None or row["role"] != "assistant":
                raise KeyError(message_id)
            if row["status"] == "streaming":
                raise HistoryError("the reply is being written", "it is being written")
            db.execute(
                """
                UPDATE messages SET status = 'streaming', writer_pid = ?, writer_started = ?,
                    prompt_tokens = NULL, reused_tokens = NULL, generated_tokens = NULL,
                    time_to_first_token_ms = NULL, tokens_per_s = NULL, finish_reason = NULL
                WHERE id = ?
                """,
                (os.getpid(), own_start(), message_id),
            )
            if _active_leaf(db, row["conversation_id"]) != message_id:
                _set_active_leaf(db, row["conversation_id"], message_id)
            return row["content"]

    def save_reply(self, message_id: int, content: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))

    def finish_reply(
        self, message_id: int, content: str, status: str, stats: MessageStats | None = None
    ) -> None:
        numbers = (
            (None,) * 6
            if stats is None
            else (
                stats.prompt_tokens,
                stats.reused_tokens,
                stats.generated_tokens,
                stats.time_to_first_token_ms,
                stats.tokens_per_s,
                stats.finish_reason,
            )
        )
        with self._transaction() as db:
            db.execute(
                """
                UPDATE messages SET content = ?, status = ?, writer_pid = NULL,
                    writer_started = NULL, prompt_tokens = ?, reused_tokens = ?,
                    generated_tokens = ?, time_to_first_token_ms = ?, tokens_per_s = ?,
                    finish_reason = ?
                WHERE id = ?
                """,
                (content, status, *numbers, message_id),
            )

    def delete_from(self, conversation_id: int, message_id: int) -> None:
        """Take a message back: delete it and everything after it on its branches; the path the
        model sees ends before it again (a question that was not answered)."""
        with self._transaction() as db:
            parent = _parent(db, message_id, conversation_id)
            _delete_subtree(db, conversation_id, message_id, parent)

    # Branches

    def branch_from(self, message_id: int) -> None:
        """From now the path the model sees ends before `message_id`, which is kept: the next
        message added follows its parent, as its sibling (a regenerated reply, an edited
        question)."""
        with self._transaction() as db:
            conversation_id, parent = _place(db, message_id)
            _set_active_leaf(db, conversation_id, parent)

    def activate(self, message_id: int) -> int:
        """Make the branch through `message_id` the active path, resumed where it was left (the
        message of its subtree most recently the active leaf, else the newest); returns the
        new active leaf. On the active path already, nothing changes."""
        with self._transaction() as db:
            conversation_id, _ = _place(db, message_id)
            leaf = _resume_point(db, message_id)
            if leaf != _active_leaf(db, conversation_id):
                _set_active_leaf(db, conversation_id, leaf)
            return leaf

    def siblings(self, message_id: int) -> Siblings:
        """Where `message_id` stands among the messages that follow its parent."""
        conversation_id, parent = _place(self._db, message_id)
        ids = tuple(
            row[0]
            for row in self._db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY id",
                (conversation_id, parent),
            )
        )
        return Siblings(ids, ids.index(message_id))

    def delete_branch(self, message_id: int) -> None:
        """Delete a message and everything after it on its branches. If the active path went
        through it, the nearest sibling's branch (the one before, else after) becomes the
        active path, resumed where it was left, else the path ends at the parent."""
        with self._transaction() as db:
            conversation_id, parent = _place(db, message_id)
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? "
                    "ORDER BY id",
                    (conversation_id, parent),
                )
            ]
            index = ids.index(message_id)
            others = ids[:index][-1:] + ids[index + 1 : index + 2]  # before, then after
            leaf = _resume_point(db, others[0]) if others else parent
            _delete_subtree(db, conversation_id, message_id, leaf)

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Messages containing `text` (case-insensitive for ASCII) on any branch, newest first."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._db.execute(
            """
            SELECT m.id, m.conversation_id, m.role, m.content, c.title FROM messages m
            JOIN conversations c ON c.id = m.conversation_id
            WHERE m.content LIKE ? ESCAPE '\\'
            ORDER BY m.id DESC LIMIT ?
            """,
            (pattern, limit),
        ).fetchall()
        paths = {c: _path_ids(self._db, c) for c in {row["conversation_id"] for row in rows}}
        return [
            SearchHit(
                row["conversation_id"],
                row["title"],
                row["id"],
                row["role"],
                _snippet(row["content"], text),
                row["id"] in paths[row["conversation_id"]],
            )
            for row in rows
        ]

    def recover(self) -> int:
        """Mark replies whose writing process is gone as interrupted; returns how many. A process
        that was given a dead writer's pid later has another start time, so it does not count."""
        rows = self._db.execute(
            "SELECT id, writer_pid, writer_started FROM messages WHERE status = 'streaming'"
        ).fetchall()
        dead = [
            row["id"]
            for row in rows
            if not process_running(row["writer_pid"], row["writer_started"])
        ]
        if dead:
            with self._transaction() as db:
                db.executemany(
                    "UPDATE messages SET status = 'interrupted', writer_pid = NULL, "
                    "writer_started = NULL WHERE id = ?",
                    [(message_id,) for message_id in dead],
                )
        return len(dead)

    # Presets

    def user_presets(self) -> dict[str, str]:
        rows = self._db.execute("SELECT name, prompt FROM presets ORDER BY name").fetchall()
        return {row["name"]: row["prompt"] for row in rows}

    def save_preset(self, name: str, prompt: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO presets (name, prompt, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET prompt = excluded.prompt",
                (name, prompt, _now()),
            )

    def delete_preset(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM presets WHERE name = ?", (name,))


class ReplyRecorder:
    """Saves a reply while it streams: the first piece at once, then at most SAVE_INTERVAL_S
    apart, so a crash loses less than a second of it.

    A save that fails (the disk is full) does not stop the reply: the recorder stops saving
    until the end, tries once more then, and `save_error` says why the history does not hold
    the whole reply (None when it does). Front ends show it once, after the reply. What was
    saved before stays "streaming" and is marked "interrupted" once this process has gone.

    With `continuing`, the reply goes on in that message (a stopped or cut one): reopened, its
    text kept, and the new pieces appended to it.
    """

    def __init__(
        self,
        store: HistoryStore,
        conversation_id: int,
        model: str | None,
        continuing: int | None = None,
    ):
        self.store = store
        self.conversation_id = conversation_id
        self.model = model
        self.text = store.reopen_reply(continuing) if continuing is not None else ""
        self.save_error: str | None = None
        self._saved_at = 0.0
        self.message_id: int | None = continuing  # None while it has no row (a full disk)
        self._write()  # the reply's row, at once

    def append(self, piece: str) -> None:
        self.text += piece
        now = time.monotonic()
        if self.save_error is None and now - self._saved_at >= SAVE_INTERVAL_S:
            self._write(lambda: self.store.save_reply(self.message_id, self.text))
            self._saved_at = now

    def finish(self, status: str, stats: MessageStats | None = None) -> None:
        self._write(lambda: self.store.finish_reply(self.message_id, self.text, status, stats))

    def _write(self, save: Callable[[], None] | None = None) -> None:
        """Give the reply its row if it has none yet, then `save`; a failure goes to save_error."""
        try:
            if self.message_id is None:
                self.message_id = self.store.start_reply(self.conversation_id, self.model)
            if save is not None:
                save()
        except HistoryError as error:
            self.save_error = (
                f"the reply could not be saved to the history at {self.store.path}: {error.reason}"
            )
        else:
            self.save_error = None


def _append(
    db: sqlite3.Connection,
    conversation_id: int,
    role: str,
    content: str,
    model: str | None,
    status: str,
) -> int:
    """Insert a message after the active leaf and make it the active leaf."""
    writing = status == "streaming"
    cursor = db.execute(
        "INSERT INTO messages (conversation_id, parent_id, role, content, model, status, "
        "writer_pid, writer_started, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            conversation_id,
            _active_leaf(db, conversation_id),
            role,
            content,
            model,
            status,
            os.getpid() if writing else None,
            own_start() if writing else None,
            _now(),
        ),
    )
    _set_active_leaf(db, conversation_id, cursor.lastrowid)
    return cursor.lastrowid


def _active_leaf(db: sqlite3.Connection, conversation_id: int) -> int | None:
    row = db.execute(
        "SELECT active_leaf FROM conversations WHERE id = ?", (conversation_id,)
    ).fetchone()
    return None if row is None else row[0]


def _set_active_leaf(db: sqlite3.Connection, conversation_id: int, leaf: int | None) -> None:
    """End the active path at `leaf` (None: before the first message), noted as its latest
    visit for activate() to resume the branch there."""
    if leaf is not None:
        db.execute(
            "UPDATE messages SET last_active = (SELECT COALESCE(MAX(last_active), 0) + 1 "
            "FROM messages WHERE conversation_id = ?) WHERE id = ?",
            (conversation_id, leaf),
        )
    db.execute(
        "UPDATE conversations SET active_leaf = ?, updated_at = ? WHERE id = ?",
        (leaf, _now(), conversation_id),
    )


def _place(db: sqlite3.Connection, message_id: int) -> tuple[int, int | None]:
    """A message's conversation and parent; KeyError if there is no such message."""
    _check_id(message_id)
    row = db.execute(
        "SELECT conversation_id, parent_id FROM messages WHERE id = ?", (message_id,)
    ).fetchone()
    if row is None:
        raise KeyError(message_id)
    return row[0], row[1]


def _parent(db: sqlite3.Connection, message_id: int, conversation_id: int) -> int | None:
    """The parent of a message that must be of `conversation_id`, else KeyError."""
    found, parent = _place(db, message_id)
    if found != conversation_id:
        raise KeyError(message_id)
    return parent


def _resume_point(db: sqlite3.Connection, message_id: int) -> int:
    """Where the branch through `message_id` was left: the message of its subtree that was most
    recently the active leaf; where none was since the tree began, the newest (a leaf)."""
    return db.execute(
        _SUBTREE + "SELECT m.id FROM messages m JOIN subtree USING (id) "
        "ORDER BY COALESCE(m.last_active, 0) DESC, m.id DESC LIMIT 1",
        (message_id,),
    ).fetchone()[0]


def _delete_subtree(
    db: sqlite3.Connection, conversation_id: int, message_id: int, leaf: int | None
) -> None:
    """Delete `message_id` and everything after it; the active path ends at `leaf` if it ran
    through them (set first: the active leaf must always be a message that exists)."""
    doomed = {row[0] for row in db.execute(_SUBTREE + "SELECT id FROM subtree", (message_id,))}
    if _active_leaf(db, conversation_id) in doomed:
        _set_active_leaf(db, conversation_id, leaf)
    else:
        db.execute(
            "UPDATE conversations SET updated_at = ? WHERE id = ?", (_now(), conversation_id)
        )
    db.execute(_SUBTREE + "DELETE FROM messages WHERE id IN subtree", (message_id,))


def _path_ids(db: sqlite3.Connection, conversation_id: int) -> set[int]:
    """The ids of the messages on a conversation's active path."""
    rows = db.execute(
        """
        WITH RECURSIVE path(id) AS (
            SELECT active_leaf FROM conversations WHERE id = ?
            UNION ALL SELECT m.parent_id FROM messages m JOIN path p ON m.id = p.id
        )
        SELECT id FROM path WHERE id IS NOT NULL
        """,
        (conversation_id,),
    )
    return {row[0] for row in rows}


def _check_id(value: int) -> None:
    if not _ID_RANGE[0] <= value <= _ID_RANGE[1]:
        raise KeyError(value)  # SQLite could not even look for it


def _summary(row: sqlite3.Row) -> ConversationSummary:
    return ConversationSummary(
        row["id"],
        row["title"],
        row["model"],
        row["created_at"],
        row["updated_at"],
        row["message_count"],
    )


def _message(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        parent_id=row["parent_id"],
        role=row["role"],
        content=row["content"],
        model=row["model"],
        status=row["status"],
        created_at=row["created_at"],
        prompt_tokens=row["prompt_tokens"],
        reused_tokens=row["reused_tokens"],
        generated_tokens=row["generated_tokens"],
        time_to_first_token_ms=row["time_to_first_token_ms"],
        tokens_per_s=row["tokens_per_s"],
        finish_reason=row["finish_reason"],
    )


def _title(content: str) -> str:
    first_line = next((line.strip() for line in content.splitlines() if line.strip()), "")
    return first_line if len(first_line) <= TITLE_LENGTH else first_line[: TITLE_LENGTH - 1] + "…"


def _snippet(content: str, text: str, width: int = 60) -> str:
    index = content.lower().find(text.lower())
    if index < 0:
        return content[:width].replace("\n", " ")
    start = max(0, index - width // 3)
    prefix = "…" if start else ""
    return (prefix + content[start : start + width]).replace("\n", " ")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
