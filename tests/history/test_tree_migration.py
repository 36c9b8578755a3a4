"""Schema version 3 (conversation trees) on a history that the release before it wrote:
fixtures/history_v2.sqlite, made by fixtures/make_history_v2.py with that release's store."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from llamachat.history import db as history_db
from llamachat.history.db import SCHEMA_VERSION, HistoryError
from llamachat.history.store import HistoryStore

FIXTURE = Path(__file__).parent / "fixtures" / "history_v2.sqlite"


@pytest.fixture
def old_history(tmp_path) -> Path:
    path = tmp_path / "history.db"
    shutil.copyfile(FIXTURE, path)
    return path


def _rows(path: Path, query: str) -> list[dict]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute(query)]
    finally:
        db.close()


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_every_message_of_a_version_2_history_is_on_its_conversations_active_path(old_history):
    assert _version(old_history) == 2
    conversations = _rows(old_history, "SELECT * FROM conversations ORDER BY id")
    messages = _rows(old_history, "SELECT * FROM messages ORDER BY id")
    presets = _rows(old_history, "SELECT * FROM presets")
    assert len(conversations) == 4 and len(messages) == 13  # what the script wrote

    store = HistoryStore(old_history)
    assert _version(old_history) == SCHEMA_VERSION
    for row in conversations:
        conversation = store.get(row["id"])
        summary = asdict(conversation.summary)
        assert {k: summary[k] for k in ("title", "model", "created_at", "updated_at")} == {
            k: row[k] for k in ("title", "model", "created_at", "updated_at")
        }
        kept = [m for m in messages if m["conversation_id"] == row["id"]]
        assert conversation.messages == conversation.tree  # one chain: all of it is the path
        for message, old in zip(conversation.messages, kept, strict=True):
            fields = asdict(message)
            parent = fields.pop("parent_id")
            assert fields == {k: old[k] for k in fields}
            assert parent == (kept[kept.index(old) - 1]["id"] if old is not kept[0] else None)
        assert conversation.active_leaf == (kept[-1]["id"] if kept else None)
        assert all(conversation.siblings(m.id).count == 1 for m in conversation.messages)
    assert _rows(old_history, "SELECT * FROM presets") == presets


def test_the_migrated_conversations_read_as_they_were_written(old_history):
    """The figures the script wrote, spelled out: the fixture is checked, not only copied."""
    store = HistoryStore(old_history)
    wall = store.get(1)
    assert wall.chat_messages() == [
        {"role": "system", "content": "Answer in one word, 一个词."},
        {"role": "user", "content": "Where is the Great Wall?"},
        {"role": "assistant", "content": "In northern China."},
        {"role": "user", "content": "长城有多长？"},
        {"role": "assistant", "content": "大约两万一千公里。"},
        {"role": "user", "content": "Tell me its whole history, in detail."},
        {"role": "assistant", "content": "The first walls were built in the 7th century BC"},
    ]
    assert [m.id for m in wall.messages] == [1, 2, 5, 7, 8, 10, 12, 13]
    cut = wall.messages[-1]
    assert (cut.status, cut.finish_reason, cut.model) == ("length", "length", "smollm2")
    assert (
        cut.prompt_tokens,
        cut.reused_tokens,
        cut.generated_tokens,
        cut.time_to_first_token_ms,
        cut.tokens_per_s,
    ) == (80, 57, 16, 15.75, 28.0)
    poem = store.get(2)
    assert poem.summary.title == "A poem"
    assert [(m.id, m.role, m.status, m.content) for m in poem.messages] == [
        (4, "user", "complete", "A short poem about the sea, please. 🌊"),
        (6, "assistant", "interrupted", "Waves fold\ninto waves —"),
        (9, "user", "complete", "Ça va? Écris-en un autre."),
        (11, "assistant", "error", ""),
    ]
    assert store.get(3).system_prompt == "You are a pirate."
    assert store.get(4).messages == () and store.get(4).active_leaf is None
    assert store.user_presets() == {"pirate": "Talk like a pirate."}


def test_a_migrated_conversation_goes_on_from_its_last_message(old_history):
    store = HistoryStore(old_history)
    question = store.add_message(1, "user", "And today?")
    assert store.get(1).messages[-2].id == 13
    assert store.get(1).tree[-1].parent_id == 13 and store.get(1).active_leaf == question
    first = store.add_message(4, "user", "Hello")  # the conversation that had no message
    assert store.get(4).tree[0].parent_id is None and store.get(4).active_leaf == first
    db = sqlite3.connect(old_history)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_migration_that_fails_midway_leaves_the_version_2_history_as_it_was(
    old_history, monkeypatch
):
    before = _rows(old_history, "SELECT * FROM messages ORDER BY id")
    migrations = history_db.MIGRATIONS
    broken = migrations[2] + "SELECT * FROM no_such_table;\n"  # the tree's, version 2 to 3
    monkeypatch.setattr(history_db, "MIGRATIONS", (*migrations[:2], broken, *migrations[3:]))
    with pytest.raises(HistoryError, match="no_such_table"):
        HistoryStore(old_history)
    assert _version(old_history) == 2
    assert _rows(old_history, "SELECT * FROM messages ORDER BY id") == before  # no parent_id
    assert "active_leaf" not in _rows(old_history, "SELECT * FROM conversations")[0]
