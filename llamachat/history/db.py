"""The history database: stdlib sqlite3 in WAL mode, schema versioned in PRAGMA user_version.

Migrations are ordered SQL scripts; MIGRATIONS[n] takes a database from version n to n + 1.
Each runs in one transaction with the version bump, so a crash mid-migration leaves the old
version intact.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from ..private import private_dir, private_file, tighten

MIGRATIONS: tuple[str, ...] = (
    # 1: conversations, their messages (with per-reply stats), and user presets
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        model TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        model TEXT,
        status TEXT NOT NULL DEFAULT 'complete'
            CHECK (status IN ('complete', 'streaming', 'interrupted', 'error')),
        writer_pid INTEGER,
        created_at TEXT NOT NULL,
        prompt_tokens INTEGER,
        reused_tokens INTEGER,
        generated_tokens INTEGER,
        time_to_first_token_ms REAL,
        tokens_per_s REAL
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    CREATE TABLE presets (
        name TEXT PRIMARY KEY,
        prompt TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    # 2: the status 'length' (a reply cut by the token limit or the full context), the engine's
    # finish_reason (stop, length, context, cancelled; not checked, so that a new reason needs no
    # rebuild), and writer_started: the writer's start time, which a later process that is given
    # the same pid does not share. SQLite cannot change a CHECK constraint, so the table is
    # rebuilt, keeping every id.
    """
    CREATE TABLE messages_v2 (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        model TEXT,
        status TEXT NOT NULL DEFAULT 'complete'
            CHECK (status IN ('complete', 'streaming', 'interrupted', 'error', 'length')),
        finish_reason TEXT,
        writer_pid INTEGER,
        writer_started TEXT,
        created_at TEXT NOT NULL,
        prompt_tokens INTEGER,
        reused_tokens INTEGER,
        generated_tokens INTEGER,
        time_to_first_token_ms REAL,
        tokens_per_s REAL
    );
    INSERT INTO messages_v2 (
        id, conversation_id, role, content, model, status, writer_pid, created_at,
        prompt_tokens, reused_tokens, generated_tokens, time_to_first_token_ms, tokens_per_s
    )
    SELECT
        id, conversation_id, role, content, model, status, writer_pid, created_at,
        prompt_tokens, reused_tokens, generated_tokens, time_to_first_token_ms, tokens_per_s
    FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    """,
    # 3: conversations as trees, so that a regenerated reply or an edited question is kept
    # beside the one it replaces. A message's parent is the message it follows (NULL: one that
    # begins its conversation); a conversation's active_leaf is where the path that the model
    # sees ends. last_active says which message was that end most recently (the highest, per
    # conversation), so that a branch opened again resumes where it was left. Until now each
    # conversation was one chain, by id: so it is migrated, its last message the active leaf.
    """
    ALTER TABLE messages ADD COLUMN parent_id INTEGER REFERENCES messages(id);
    ALTER TABLE messages ADD COLUMN last_active INTEGER;
    ALTER TABLE conversations ADD COLUMN active_leaf INTEGER REFERENCES messages(id);
    UPDATE messages SET parent_id = (
        SELECT MAX(earlier.id) FROM messages earlier
        WHERE earlier.conversation_id = messages.conversation_id AND earlier.id < messages.id
    );
    UPDATE conversations SET active_leaf = (
        SELECT MAX(m.id) FROM messages m WHERE m.conversation_id = conversations.id
    );
    UPDATE messages SET last_active = 1 WHERE id IN (SELECT active_leaf FROM conversations);
    CREATE INDEX messages_by_parent ON messages (parent_id);
    CREATE INDEX conversations_by_active_leaf ON conversations (active_leaf);
    """,
    # 4: a conversation's own settings (history/conversation_settings.py), as a JSON object of
    # the fields chosen for it; '{}' for every conversation until now.
    """
    ALTER TABLE conversations ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


# Below this much free space, an I/O error is taken for a full disk: SQLite reports a full disk
# as "disk I/O error" when it cannot grow its shared-memory file (-shm) on opening.
NEARLY_FULL_BYTES = 1 << 20


class HistoryError(Exception):
    """The history database cannot be opened or written, or is newer than this llamachat.
    `reason` is the cause alone ("the disk is full"), for messages that name the path anew."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def describe(error: sqlite3.Error, path: Path) -> str:
    """What went wrong, in words: a full disk is said so, whichever way SQLite reports it."""
    code = getattr(error, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return "the disk is full"
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        try:
            if shutil.disk_usage(path.parent).free < NEARLY_FULL_BYTES:
                return "the disk is full"
        except OSError:
            pass
    return str(error)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the settings every writer needs, migrated to the current schema. The
    database is private (0600, in a 0700 folder); SQLite gives its -wal and -shm files the
    database's mode, and those an older llamachat left are tightened here."""
    try:
        private_dir(path.parent)
        private_file(path)
        for companion in ("-wal", "-shm"):
            tighten(path.with_name(path.name + companion))
    except OSError as error:
        raise HistoryError(f"cannot open the history at {path}: {error.strerror}") from None
    try:
        connection = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = NORMAL")
        migrate(connection)
    except sqlite3.DatabaseError as error:
        reason = describe(error, path)
        raise HistoryError(f"cannot open the history at {path}: {reason}", reason) from None
    return connection


def migrate(connection: sqlite3.Connection) -> None:
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise HistoryError(
            f"the history database is at version {version}, newer than this llamachat "
            f"({SCHEMA_VERSION}); upgrade llamachat"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        # executescript would commit on its own; the version bump must share the transaction.
        connection.execute("BEGIN IMMEDIATE")
        try:
            current = connection.execute("PRAGMA user_version").fetchone()[0]
            if current >= target:  # another process migrated meanwhile
                connection.execute("ROLLBACK")
                continue
            for statement in _statements(MIGRATIONS[target - 1]):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {target}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:  # SQLite may have rolled back already (a full disk)
                connection.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return [s for s in statements if s]
