"""The conversation store: real SQLite, real processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from llamachat.history.db import MIGRATIONS, SCHEMA_VERSION, HistoryError, connect
from llamachat.history.export import to_json, to_markdown
from llamachat.history.presets import BUILTIN_PRESETS, all_presets, preset_prompt
from llamachat.history.store import HistoryStore, MessageStats, ReplyRecorder


@pytest.fixture
def store(tmp_path):
    return HistoryStore(tmp_path / "history.db")


def test_a_conversation_keeps_its_turns_and_its_latest_system_prompt(store):
    conversation = store.create(model="smollm2", system_prompt="Be brief.")
    store.add_message(conversation, "user", "Hello there!\nSecond line")
    store.add_message(conversation, "assistant", "Hi.", model="smollm2")
    store.set_system_prompt(conversation, "Be verbose.")
    store.add_message(conversation, "user", "Again")
    loaded = store.get(conversation)
    assert loaded.summary.title == "Hello there!"
    assert loaded.system_prompt == "Be verbose."
    assert loaded.chat_messages() == [
        {"role": "system", "content": "Be verbose."},
        {"role": "user", "content": "Hello there!\nSecond line"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again"},
    ]
    assert [m.role for m in loaded.messages] == ["system", "user", "assistant", "system", "user"]


def test_conversations_are_listed_newest_first(store):
    first = store.create()
    second = store.create()
    store.add_message(first, "user", "bump")
    assert [c.id for c in store.conversations()] == [first, second]
    assert store.latest().id == first


def test_exists_says_whether_a_conversation_is_there_until_it_is_deleted(store):
    conversation = store.create(model="tiny")
    assert store.exists(conversation) and not store.exists(conversation + 1)
    store.delete(conversation)
    assert not store.exists(conversation)


def test_long_titles_are_cut(store):
    conversation = store.create()
    store.add_message(conversation, "user", "x" * 200)
    assert len(store.get(conversation).summary.title) == 60


def test_rename_delete_and_delete_from(store):
    conversation = store.create()
    store.add_message(conversation, "user", "one")
    reply = store.add_message(conversation, "assistant", "two")
    store.add_message(conversation, "user", "three")
    store.delete_from(conversation, reply)
    assert [m.content for m in store.get(conversation).messages] == ["one"]
    store.rename(conversation, "  Renamed  ")
    assert store.get(conversation).summary.title == "Renamed"
    store.delete(conversation)
    assert store.conversations() == []
    with pytest.raises(KeyError):
        store.get(conversation)
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_search_finds_substrings_in_any_script_and_escapes_wildcards(store):
    one = store.create()
    store.add_message(one, "user", "长城有多长？")
    store.add_message(one, "assistant", "About 21,000 km, 100% of it old.")
    two = store.create()
    store.add_message(two, "user", "The GREAT wall")
    assert {hit.conversation_id for hit in store.search("great wall")} == {two}
    (hit,) = store.search("长城")
    assert hit.conversation_id == one and hit.role == "user" and "长城" in hit.snippet
    assert [h.role for h in store.search("100%")] == ["assistant"]
    assert store.search("1_0") == []


def test_a_streaming_reply_is_recorded_and_finished(store):
    conversation = store.create()
    store.add_message(conversation, "user", "Hi")
    recorder = ReplyRecorder(store, conversation, "smollm2")
    recorder.append("Hel")
    assert store.get(conversation).messages[-1].content == "Hel"
    assert store.get(conversation).messages[-1].status == "streaming"
    recorder.append("lo")
    recorder.finish("complete", MessageStats(10, 4, 2, 12.5, 30.0))
    message = store.get(conversation).messages[-1]
    assert (message.content, message.status, message.reused_tokens) == ("Hello", "complete", 4)


def test_presets_builtin_and_user(store):
    assert set(BUILTIN_PRESETS) <= set(all_presets(store))
    assert "中英翻译" in all_presets(store)
    store.save_preset("pirate", "Talk like a pirate.")
    store.save_preset("pirate", "Talk like a polite pirate.")
    assert preset_prompt(store, "pirate") == "Talk like a polite pirate."
    store.delete_preset("pirate")
    with pytest.raises(KeyError):
        preset_prompt(store, "pirate")


def test_exports(store):
    conversation = store.create(model="smollm2", system_prompt="Be brief.")
    store.add_message(conversation, "user", "Hi 你好")
    store.add_message(conversation, "assistant", "```python\nprint(1)\n```", model="smollm2")
    loaded = store.get(conversation)
    markdown = to_markdown(loaded)
    assert markdown.startswith("# Hi 你好\n")
    assert "## System prompt\n\nBe brief." in markdown
    assert "## Assistant (smollm2)\n\n```python\nprint(1)\n```" in markdown
    import json

    data = json.loads(to_json(loaded))
    assert [m["content"] for m in data["messages"]] == [
        "Be brief.",
        "Hi 你好",
        "```python\nprint(1)\n```",
    ]


def _database_at(path, version: int) -> None:
    """A history database as llamachat version `version` of the schema left it, with data."""
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version = {version}")
    if version >= 1:
        db.execute(
            "INSERT INTO conversations (id, title, created_at, updated_at) "
            "VALUES (7, 'old', 't', 't')"
        )
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at) "
            "VALUES (7, 'user', 'kept', 't')"
        )
    if version >= 3:  # a tree: the conversation's path ends at its message
        db.execute("UPDATE conversations SET active_leaf = (SELECT MAX(id) FROM messages)")
    db.commit()
    db.close()


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_every_earlier_schema_migrates_to_the_current_one_keeping_data(tmp_path, version):
    path = tmp_path / "history.db"
    _database_at(path, version)
    store = HistoryStore(path)
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    if version >= 1:
        assert [m.content for m in store.get(7).messages] == ["kept"]
    conversation = store.create()
    store.add_message(conversation, "user", "works")


def _rows(db, table: str) -> list[dict]:
    db.row_factory = sqlite3.Row
    return [dict(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY 1")]


def test_a_version_1_database_keeps_every_row_through_the_migration_to_version_2(tmp_path):
    """Version 2 rebuilds the messages table (SQLite cannot change a CHECK constraint) to allow
    the status 'length', and adds finish_reason and writer_started. (Version 3's columns, for
    conversation trees, are checked in test_tree_migration.py.)"""
    path = tmp_path / "history.db"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0])  # as the release with schema version 1 creates it
    old.execute("PRAGMA user_version = 1")
    old.execute("PRAGMA foreign_keys = ON")
    old.executemany(
        "INSERT INTO conversations (id, title, model, created_at, updated_at) VALUES (?,?,?,?,?)",
        [(3, "first", "smollm2", "t1", "t2"), (9, "", None, "t3", "t3")],
    )
    statuses = ["complete", "streaming", "interrupted", "error"]
    old.executemany(
        "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(11, 3, "system", "Be brief.", None, "complete", None, "t1", *[None] * 5)]
        + [(20, 3, "user", "Hi 你好", None, "complete", None, "t1", *[None] * 5)]
        + [
            (30 + i, 3 + 6 * (i % 2), "assistant", f"reply {status}", "smollm2", status,
             os.getpid() if status == "streaming" else None, f"t{i}", 10 + i, 4, 2, 12.5, 30.0)
            for i, status in enumerate(statuses)
        ],
    )  # fmt: skip
    old.execute("INSERT INTO presets VALUES ('pirate', 'Arr.', 't')")
    old.commit()
    before = {table: _rows(old, table) for table in ("conversations", "messages", "presets")}
    old.close()

    db = connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    after = {table: _rows(db, table) for table in ("conversations", "messages", "presets")}
    later = ("finish_reason", "writer_started", "parent_id", "last_active", "active_leaf")
    later += ("settings",)
    for table in ("conversations", "messages"):
        after[table] = [{k: v for k, v in row.items() if k not in later} for row in after[table]]
    assert after == before
    assert {
        tuple(row) for row in db.execute("SELECT finish_reason, writer_started FROM messages")
    } == {(None, None)}
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    indexes = {row["name"] for row in db.execute("PRAGMA index_list(messages)")}
    assert indexes == {"messages_by_conversation", "messages_by_parent"}
    db.execute(
        "INSERT INTO messages (conversation_id, role, content, status, finish_reason, created_at)"
        " VALUES (9, 'assistant', 'cut', 'length', 'context', 't')"
    )
    with pytest.raises(sqlite3.IntegrityError):  # the other checks stay
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, status, created_at)"
            " VALUES (9, 'assistant', 'x', 'lost', 't')"
        )
    with pytest.raises(sqlite3.IntegrityError):
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at)"
            " VALUES (404, 'user', 'x', 't')"
        )
    db.execute("DELETE FROM conversations WHERE id = 9")  # still cascades
    assert [row["id"] for row in db.execute("SELECT id FROM messages")] == [11, 20, 30, 32]


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(HistoryError, match="newer"):
        connect(path)


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from llamachat.history.store import HistoryStore, ReplyRecorder
    store = HistoryStore(Path(sys.argv[1]))
    conversation = store.create(model="m")
    store.add_message(conversation, "user", "Tell me a story")
    recorder = ReplyRecorder(store, conversation, "m")
    for index in range(100000):
        recorder.append(f"word{index} ")
        time.sleep(0.01)
    """
)


def _wait_for_words(path, count: int) -> None:
    """Until the reply that WRITER records holds `count` words."""
    deadline = time.monotonic() + 60
    content = ""
    while content.count("word") < count:
        assert time.monotonic() < deadline, "the writer did not write"
        time.sleep(0.1)
        if path.exists():
            try:
                row = (
                    sqlite3.connect(path)
                    .execute("SELECT content FROM messages WHERE role = 'assistant'")
                    .fetchone()
                )
            except sqlite3.OperationalError:
                continue
            content = row[0] if row else ""


def test_a_writer_killed_mid_reply_leaves_a_consistent_database(tmp_path):
    path = tmp_path / "history.db"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    _wait_for_words(path, 50)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = HistoryStore(path)  # opening recovers what the dead writer left
    (conversation,) = store.conversations()
    reply = store.get(conversation.id).messages[-1]
    assert reply.status == "interrupted"
    words = reply.content.split()
    assert len(words) >= 50
    assert words == [f"word{i}" for i in range(len(words))]


def test_a_killed_writers_pid_taken_by_a_live_process_does_not_keep_its_reply_streaming(
    tmp_path,
):
    path = tmp_path / "history.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        _wait_for_words(path, 5)
        (reply,) = HistoryStore(path).get(1).messages[1:]
        assert reply.status == "streaming"  # its writer runs: opening the history leaves it be
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    # The kernel hands the dead writer's pid to a process started later: here, one started now
    # takes its place in the row, as if it had been given the same number.
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        db = sqlite3.connect(path)
        db.execute("UPDATE messages SET writer_pid = ? WHERE status = 'streaming'", (later.pid,))
        db.commit()
        db.close()
        (reply,) = HistoryStore(path).get(1).messages[1:]
        assert reply.status == "interrupted"
    finally:
        later.kill()
        later.wait()


CONCURRENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from llamachat.history.store import HistoryStore
    store = HistoryStore(Path(sys.argv[1]))
    shared, tag = int(sys.argv[2]), sys.argv[3]
    own = store.create(title=tag)
    for index in range(150):
        store.add_message(own, "user", f"{tag}-{index}")
        store.add_message(shared, "user", f"{tag}-shared-{index}")
    """
)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "history.db"
    shared = HistoryStore(path).create(title="shared")
    writers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(path), str(shared), tag])
        for tag in ("a", "b")
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    store = HistoryStore(path)
    by_title = {c.title: c for c in store.conversations()}
    assert by_title["a"].message_count == by_title["b"].message_count == 150
    contents = {m.content for m in store.get(shared).messages}
    assert contents == {f"{tag}-shared-{i}" for tag in "ab" for i in range(150)}
