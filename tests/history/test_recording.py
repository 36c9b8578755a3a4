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
