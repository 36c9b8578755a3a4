"""`llamachat history` on a conversation with branches: the tree shown and exported, hits on
any branch, a branch opened, and `-c` going on from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamachat.history.store import HistoryStore, MessageStats, ReplyRecorder
from tests.conftest import run_cli

OUTLINE = """\
conversation 1: Name an animal (* marks the active path)
* 1 system: Be brief.
* ├─ 2 user: Name an animal
  │  ├─ 3 assistant: A zebra.
* │  └─ 4 assistant: A lion.
* │     5 user: Where does it live?
* │     6 assistant: In Africa.
  └─ 7 user: Name a bird 🐦
     8 assistant (cut: token limit): A robin, which
"""


@pytest.fixture
def branched(env) -> HistoryStore:
    """Conversation 1 as OUTLINE draws it: a reply regenerated, the question edited, and the
    first regenerated reply's branch active again; conversation 2 beside it."""
    store = HistoryStore(Path(env["LLAMACHAT_HOME"]) / "history.db")
    conversation = store.create(model="smollm2", system_prompt="Be brief.")
    question = store.add_message(conversation, "user", "Name an animal")
    zebra = store.add_message(conversation, "assistant", "A zebra.")
    store.branch_from(zebra)
    lion = store.add_message(conversation, "assistant", "A lion.")
    store.add_message(conversation, "user", "Where does it live?")
    store.add_message(conversation, "assistant", "In Africa.\nOn the savanna.")
    store.branch_from(question)
    store.add_message(conversation, "user", "Name a bird 🐦")
    recorder = ReplyRecorder(store, conversation, "smollm2")
    recorder.append("A robin, which")
    recorder.finish("length", MessageStats(20, 0, 3, 10.0, 30.0, "length"))
    store.activate(lion)
    other = store.create(model="smollm2")
    store.add_message(other, "user", "Something else")
    assert [zebra, lion, recorder.message_id] == [3, 4, 8]
    return store


def test_show_tree_draws_every_branch_and_marks_the_active_path(env, branched):
    result = run_cli("history", "show", "1", "--tree", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == OUTLINE


def test_show_prints_the_active_path_only(env, branched):
    shown = run_cli("history", "show", "1", env=env).stdout.decode()
    assert "A lion." in shown and "In Africa." in shown
    assert "zebra" not in shown and "bird" not in shown


@pytest.mark.parametrize("command", [["show", "1", "--json"], ["export", "1", "-f", "json"]])
def test_json_holds_every_branch_and_the_active_path(env, branched, command):
    result = run_cli("history", *command, env=env)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    messages = data["messages"]
    assert [m["id"] for m in messages] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [m["parent_id"] for m in messages] == [None, 1, 2, 2, 4, 5, 1, 7]
    assert (data["active_leaf"], data["active_path"]) == (6, [1, 2, 4, 5, 6])
    assert messages[5]["content"] == "In Africa.\nOn the savanna."
    cut = messages[7]
    assert (cut["role"], cut["model"], cut["status"], cut["finish_reason"]) == (
        "assistant",
        "smollm2",
        "length",
        "length",
    )
    assert (cut["prompt_tokens"], cut["generated_tokens"], cut["tokens_per_s"]) == (20, 3, 30.0)
    assert messages[6]["content"] == "Name a bird 🐦" and messages[6]["created_at"]


def test_search_finds_a_reply_on_another_branch_and_show_at_makes_it_active(env, branched):
    (hit,) = json.loads(run_cli("history", "search", "zebra", "--json", env=env).stdout)
    assert (hit["conversation_id"], hit["message_id"], hit["active"]) == (1, 3, False)
    table = run_cli("history", "search", "zebra", env=env)
    (row,) = table.stdout.decode().splitlines()[1:]
    assert row.split()[:4] == ["1", "3", "other", "assistant"]
    assert b"history show ID --at MESSAGE" in table.stderr
    shown = run_cli("history", "show", "1", "--at", "3", env=env)
    assert shown.returncode == 0, shown.stderr.decode()
    assert "A zebra." in shown.stdout.decode() and "lion" not in shown.stdout.decode()
    assert [m.id for m in branched.get(1).messages] == [1, 2, 3]
    # Back to the bird: that branch is resumed where it was left, at its cut reply.
    outline = run_cli("history", "show", "1", "--at", "7", "--tree", env=env).stdout.decode()
    assert "* └─ 7 user: Name a bird" in outline and "*    8 assistant" in outline
    (hit,) = json.loads(run_cli("history", "search", "robin", "--json", env=env).stdout)
    assert hit["active"]


def test_continue_goes_on_from_the_active_leaf(env, branched, tiny_store):
    (Path(env["LLAMACHAT_HOME"]) / "models").symlink_to(tiny_store.root)
    branched.activate(3)  # the zebra; conversation 2 is newer, so make 1 the latest again
    branched.add_message(1, "user", "Is it striped?")
    flags = ["-m", "tiny", "--device", "cpu", "--temperature", "0", "--max-tokens", "3"]
    answered = run_cli("-c", *flags, env=env, input=b"And its colours?")
    assert answered.returncode == 0, answered.stderr.decode()
    conversation = branched.get(1)
    assert [m.content for m in conversation.messages][1:5] == [
        "Name an animal",
        "A zebra.",
        "Is it striped?",
        "And its colours?",
    ]
    reply = conversation.messages[-1]
    assert reply.role == "assistant" and reply.parent_id == conversation.messages[-2].id
    assert len(conversation.tree) == 11  # the other branches are all still there


def test_a_continued_question_too_long_for_the_context_is_taken_back_alone(
    env, branched, tiny_store
):
    (Path(env["LLAMACHAT_HOME"]) / "models").symlink_to(tiny_store.root)
    branched.activate(7)  # the bird's branch, and conversation 1 the latest
    before = branched.get(1)
    flags = ["-m", "tiny", "--device", "cpu", "--ctx", "64"]
    refused = run_cli("-c", *flags, env=env, input=b"the quick brown fox " * 40)
    assert refused.returncode == 1 and b"context of 64" in refused.stderr
    after = branched.get(1)
    assert after.tree == before.tree and after.active_leaf == before.active_leaf == 8


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["1", "--at", "999"], "conversation 1 has no message 999"),
        (["1", "--at", "9"], "conversation 1 has no message 9"),  # conversation 2's
        (["1", "--at", str(2**70)], f"conversation 1 has no message {2**70}"),
        (["999", "--at", "1"], "no conversation 999"),
        (["999", "--tree"], "no conversation 999"),
    ],
)
def test_a_message_or_conversation_that_is_not_there_is_one_line(env, branched, args, line):
    result = run_cli("history", "show", *args, env=env)
    assert result.returncode == 1 and result.stdout == b""
    (said,) = result.stderr.decode().splitlines()
    assert said.startswith(f"llamachat: error: {line} (`llamachat history ")
    assert [m.id for m in branched.get(1).messages] == [1, 2, 4, 5, 6]  # nothing changed


def test_a_message_id_that_is_not_a_number_is_a_usage_error(env, branched):
    result = run_cli("history", "show", "1", "--at", "three", env=env)
    assert result.returncode == 2 and result.stdout == b"" and b"Traceback" not in result.stderr
