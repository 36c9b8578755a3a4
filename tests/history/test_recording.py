"""Replies recorded while they stream, from the real engine on a tiny model: how each one ended
is stored, as its status and the engine's finish reason."""

from __future__ import annotations

import threading

import pytest

from llamachat.engine import GREEDY
from llamachat.history.export import to_markdown
from llamachat.history.recording import recorded
from llamachat.history.store import HistoryStore, ReplyRecorder, StoredMessage

QUESTION = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def store(tmp_path):
    return HistoryStore(tmp_path / "history.db")


def start(store: HistoryStore) -> tuple[int, ReplyRecorder]:
    conversation = store.create(model="tiny")
    store.add_message(conversation, "user", QUESTION[0]["content"])
    return conversation, ReplyRecorder(store, conversation, "tiny")


def record(store: HistoryStore, reply) -> tuple[str, StoredMessage]:
    conversation, recorder = start(store)
    text = "".join(recorded(reply, recorder))
    return text, store.get(conversation).messages[-1]


def test_a_reply_cut_by_the_token_limit_is_stored_as_cut(store, tiny_model):
    reply = tiny_model.session().reply(QUESTION, GREEDY, max_new_tokens=5)
    text, message = record(store, reply)
    assert (message.status, message.finish_reason) == ("length", "length")
    assert message.content == text and message.generated_tokens == 5
    assert "## Assistant (tiny) — cut: token limit\n" in to_markdown(store.get(1))


def test_a_reply_cut_by_the_full_context_is_stored_as_cut(store, tiny_model):
    reply = tiny_model.session(64).reply(QUESTION, GREEDY)
    text, message = record(store, reply)
    assert (message.status, message.finish_reason) == ("length", "context")
    assert message.content == text
    assert "## Assistant (tiny) — cut: context full\n" in to_markdown(store.get(1))


def test_a_reply_that_ends_by_itself_is_complete(store, tiny_model):
    # The tiny model rarely picks its end-of-sequence token; a stop string from its own greedy
    # answer ends the reply the same way ("stop").
    answer = "".join(tiny_model.session().reply(QUESTION, GREEDY, max_new_tokens=40))
    reply = tiny_model.session().reply(QUESTION, GREEDY, max_new_tokens=40, stop=[answer[20:26]])
    text, message = record(store, reply)
    assert (message.status, message.finish_reason) == ("complete", "stop")
    assert message.content == text and len(text) < len(answer)
    assert "## Assistant (tiny)\n" in to_markdown(store.get(1))


def test_a_cancelled_reply_is_interrupted(store, tiny_model):
    cancel = threading.Event()
    reply = tiny_model.session().reply(QUESTION, GREEDY, max_new_tokens=50, cancel=cancel)
    conversation, recorder = start(store)
    pieces = recorded(reply, recorder)
    text = next(pieces)
    cancel.set()
    text += "".join(pieces)
    message = store.get(conversation).messages[-1]
    assert (message.status, message.finish_reason) == ("interrupted", "cancelled")
    assert message.content == text and message.generated_tokens < 50


def test_a_reply_whose_reader_went_away_is_interrupted(store, tiny_model):
    reply = tiny_model.session().reply(QUESTION, GREEDY, max_new_tokens=50)
    conversation, recorder = start(store)
    pieces = recorded(reply, recorder)
    text = next(pieces)
    pieces.close()  # as when the output pipe closes
    message = store.get(conversation).messages[-1]
    assert (message.status, message.finish_reason, message.content) == ("interrupted", None, text)


def test_a_continued_reply_goes_on_in_the_same_message(store):
    conversation = store.create(model="tiny")
    store.add_message(conversation, "user", "Hello")
    stopped = store.start_reply(conversation, "tiny")
    store.finish_reply(stopped, "Half an answ", "interrupted")
    store.add_message(conversation, "user", "Later question")  # the path went on past it
    store.branch_from(stopped)
    store.activate(stopped)  # a flip back: the path ends at the stopped reply again
    recorder = ReplyRecorder(store, conversation, "tiny", continuing=stopped)
    assert (recorder.message_id, recorder.text) == (stopped, "Half an answ")
    reopened = store.get(conversation).messages[-1]
    assert (reopened.id, reopened.status, reopened.finish_reason) == (stopped, "streaming", None)
    recorder.append("er.")
    recorder.finish("complete")
    conversation_now = store.get(conversation)
    assert conversation_now.active_leaf == stopped
    (reply,) = [m for m in conversation_now.tree if m.role == "assistant"]
    assert (reply.id, reply.content, reply.status) == (stopped, "Half an answer.", "complete")
    assert store.recover() == 0


def test_a_reopened_reply_whose_writer_died_is_interrupted_again(store, monkeypatch):
    conversation = store.create(model="tiny")
    store.add_message(conversation, "user", "Hello")
    cut = store.start_reply(conversation, "tiny")
    store.finish_reply(cut, "Cut by the lim", "length")
    monkeypatch.setattr("llamachat.history.store.own_start", lambda: -1.0)  # another start
    store.reopen_reply(cut)
    assert store.recover() == 1
    assert store.get(conversation).messages[-1].status == "interrupted"


def test_only_a_finished_reply_reopens(store):
    from llamachat.history.db import HistoryError

    conversation = store.create(model="tiny")
    question = store.add_message(conversation, "user", "Hello")
    with pytest.raises(KeyError):
        store.reopen_reply(question)
    writing = store.start_reply(conversation, "tiny")
    with pytest.raises(HistoryError):
        store.reopen_reply(writing)
