"""Conversations as trees: branches added, switched between and deleted, on real SQLite."""

from __future__ import annotations

import pytest

from llamachat.history.store import HistoryStore, ReplyRecorder, Siblings


@pytest.fixture
def store(tmp_path):
    return HistoryStore(tmp_path / "history.db")


def path(store: HistoryStore, conversation: int) -> list[str]:
    return [m.content for m in store.get(conversation).messages]


def regenerate(store: HistoryStore, conversation: int, reply: int, text: str) -> int:
    """As the chat app regenerates: a sibling of `reply`, recorded as replies are."""
    store.branch_from(reply)
    recorder = ReplyRecorder(store, conversation, "m")
    recorder.append(text)
    recorder.finish("complete")
    return recorder.message_id


@pytest.fixture
def talk(store):
    """A conversation: system prompt, then two turns. Returns its id and its messages' ids."""
    conversation = store.create(system_prompt="Be brief.")
    ids = [
        store.add_message(conversation, "user", "Q1"),
        store.add_message(conversation, "assistant", "A1"),
        store.add_message(conversation, "user", "Q2"),
        store.add_message(conversation, "assistant", "A2"),
    ]
    return conversation, ids


def test_each_message_added_follows_the_active_leaf_and_becomes_it(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    loaded = store.get(conversation)
    system = loaded.messages[0].id
    assert [m.parent_id for m in loaded.messages] == [None, system, q1, a1, q2]
    assert loaded.active_leaf == a2 and loaded.tree == loaded.messages
    assert store.siblings(q2) == Siblings((q2,), 0) == loaded.siblings(q2)


def test_a_regenerated_reply_is_a_sibling_and_the_one_it_replaces_is_kept(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.branch_from(a2)
    assert path(store, conversation) == ["Be brief.", "Q1", "A1", "Q2"]  # what the model sees
    again = store.add_message(conversation, "assistant", "A2 again")
    loaded = store.get(conversation)
    assert path(store, conversation) == ["Be brief.", "Q1", "A1", "Q2", "A2 again"]
    assert [m.content for m in loaded.tree] == ["Be brief.", "Q1", "A1", "Q2", "A2", "A2 again"]
    assert store.siblings(again) == Siblings((a2, again), 1) == loaded.siblings(again)
    assert loaded.siblings(a2) == Siblings((a2, again), 0) and loaded.siblings(a2).count == 2
    assert [m.id for m in loaded.children(q2)] == [a2, again]


def test_an_edited_earlier_question_is_a_sibling_and_the_reply_follows_it(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.branch_from(q1)
    edited = store.add_message(conversation, "user", "Q1, edited")
    reply = store.add_message(conversation, "assistant", "A1'")
    assert path(store, conversation) == ["Be brief.", "Q1, edited", "A1'"]
    assert store.siblings(edited) == Siblings((q1, edited), 1)
    assert store.get(conversation).chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1, edited"},
        {"role": "assistant", "content": "A1'"},
    ]
    assert len(store.get(conversation).tree) == 7 and store.get(conversation).active_leaf == reply


def test_the_first_message_edited_has_siblings_that_begin_the_conversation(store):
    conversation = store.create()
    first = store.add_message(conversation, "user", "Hi")
    store.add_message(conversation, "assistant", "Hello")
    store.branch_from(first)
    assert store.get(conversation).messages == ()
    second = store.add_message(conversation, "user", "Hi again")
    assert store.siblings(first) == Siblings((first, second), 0)
    assert [m.id for m in store.get(conversation).children(None)] == [first, second]
    other = store.create()  # another conversation's first message is no sibling of these
    store.add_message(other, "user", "elsewhere")
    assert store.siblings(second).ids == (first, second)


def test_switching_back_to_a_branch_resumes_it_where_it_was_left(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    a2b = regenerate(store, conversation, a2, "A2b")  # turn 2 has two replies; A2b is the newest
    store.activate(a2)  # the user prefers the first: the path is A2's again
    assert path(store, conversation)[-1] == "A2"
    store.branch_from(q1)  # then tries another first question, with its own reply
    q1b = store.add_message(conversation, "user", "Q1b")
    a1b = store.add_message(conversation, "assistant", "A1b")
    assert path(store, conversation) == ["Be brief.", "Q1b", "A1b"]
    # Back to the first question: where that branch was left (A2), not its newest reply (A2b).
    assert store.activate(q1) == a2
    assert path(store, conversation) == ["Be brief.", "Q1", "A1", "Q2", "A2"]
    assert store.activate(q1b) == a1b
    assert store.activate(a2b) == a2b
    assert path(store, conversation)[-1] == "A2b"


def test_activating_a_message_on_the_active_path_changes_nothing(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    before = store.get(conversation)
    assert store.activate(q1) == a2
    after = store.get(conversation)
    assert after.messages == before.messages
    assert after.summary.updated_at == before.summary.updated_at  # nothing was written


def test_activating_a_message_resumes_below_it_even_where_no_leaf_was_visited(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.branch_from(q2)  # the path ends at A1 now; A1's subtree still holds Q2 and A2
    assert store.activate(q2) == a2  # the newest of Q2's branch


def test_deleting_the_active_branch_moves_to_the_sibling_before_it(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    a2b = regenerate(store, conversation, a2, "A2b")
    a2c = regenerate(store, conversation, a2b, "A2c")
    store.delete_branch(a2b)  # not on the path: the path stays
    assert path(store, conversation)[-1] == "A2c"
    assert store.siblings(a2c) == Siblings((a2, a2c), 1)
    store.delete_branch(a2c)
    assert path(store, conversation)[-1] == "A2"
    assert store.get(conversation).active_leaf == a2


def test_deleting_the_first_of_the_siblings_moves_to_the_next_one(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.branch_from(q1)
    q1b = store.add_message(conversation, "user", "Q1b")
    a1b = store.add_message(conversation, "assistant", "A1b")
    store.activate(q1)
    store.delete_branch(q1)  # Q1 and everything after it
    assert path(store, conversation) == ["Be brief.", "Q1b", "A1b"]
    assert [m.id for m in store.get(conversation).tree][1:] == [q1b, a1b]
    for gone in (q1, a1, q2, a2):
        with pytest.raises(KeyError):
            store.siblings(gone)


def test_deleting_an_only_child_ends_the_path_at_its_parent(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.delete_branch(q2)
    assert path(store, conversation) == ["Be brief.", "Q1", "A1"]
    store.add_message(conversation, "user", "Q2b")
    assert path(store, conversation) == ["Be brief.", "Q1", "A1", "Q2b"]
    store.delete_branch(store.get(conversation).messages[0].id)  # the system prompt: all of it
    assert store.get(conversation).tree == () and store.get(conversation).active_leaf is None


def test_a_question_taken_back_leaves_the_path_where_it_was(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.branch_from(q2)
    q2b = store.add_message(conversation, "user", "too long")  # an edit the model refused
    store.delete_from(conversation, q2b)
    assert path(store, conversation) == ["Be brief.", "Q1", "A1"]  # before the edited message
    assert store.siblings(q2) == Siblings((q2,), 0)  # the question edited is kept
    with pytest.raises(KeyError):
        store.delete_from(conversation + 1, q2)  # not a message of that conversation


def test_the_system_prompt_is_the_latest_on_the_active_path(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    store.set_system_prompt(conversation, "Be verbose.")
    store.add_message(conversation, "user", "Q3")
    assert store.get(conversation).system_prompt == "Be verbose."
    regenerate(store, conversation, a2, "A2b")  # a branch on which it never changed
    assert store.get(conversation).system_prompt == "Be brief."
    assert store.get(conversation).chat_messages()[0] == {"role": "system", "content": "Be brief."}
    store.activate(a2)
    assert store.get(conversation).system_prompt == "Be verbose."


def test_search_finds_text_on_a_branch_that_is_not_active_and_activating_it_opens_it(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    regenerate(store, conversation, a2, "A different second answer")
    (hit,) = store.search("A2")
    assert (hit.message_id, hit.conversation_id, hit.active) == (a2, conversation, False)
    assert store.search("different")[0].active
    store.activate(hit.message_id)
    assert path(store, conversation)[-1] == "A2"
    assert store.search("A2")[0].active


@pytest.mark.parametrize("method", ["activate", "branch_from", "siblings", "delete_branch"])
def test_an_unknown_message_is_a_key_error(store, talk, method):
    for unknown in (999, 2**70):
        with pytest.raises(KeyError):
            getattr(store, method)(unknown)


def test_deleting_a_conversation_deletes_every_branch(store, talk):
    conversation, (q1, a1, q2, a2) = talk
    regenerate(store, conversation, a2, "A2b")
    store.delete(conversation)
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
