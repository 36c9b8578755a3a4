"""A conversation's own settings in the history (schema 4) and over the options it runs with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llamachat.backends.base import Sampling
from llamachat.chat_options import ChatOptions, OptionsError
from llamachat.history.conversation_settings import ConversationSettings
from llamachat.history.store import HistoryStore

FIXTURE = Path(__file__).parent / "fixtures" / "history_v2.sqlite"


def test_they_are_kept_and_replaced_whole(tmp_path):
    store = HistoryStore(tmp_path / "history.db")
    conversation = store.create(model="m")
    assert store.get(conversation).settings == ConversationSettings()
    store.set_settings(conversation, ConversationSettings(temperature=0.2, ctx=512))
    again = HistoryStore(tmp_path / "history.db")  # another connection: on disk
    assert again.get(conversation).settings.chosen() == {"temperature": 0.2, "ctx": 512}
    store.set_settings(conversation, ConversationSettings(top_k=5))
    assert again.get(conversation).settings.chosen() == {"top_k": 5}
    with pytest.raises(KeyError):
        store.set_settings(conversation + 1, ConversationSettings(top_k=5))


def test_a_migrated_history_has_none_of_its_own(tmp_path):
    copy = tmp_path / "history.db"
    shutil.copy(FIXTURE, copy)
    store = HistoryStore(copy)
    conversations = store.conversations()
    assert conversations
    assert all(store.get(c.id).settings == ConversationSettings() for c in conversations)


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ('{"temperature": 1, "top_k": 40}', {"temperature": 1.0, "top_k": 40}),
        ('{"top_k": 2.5, "ctx": true, "colour": "red"}', {}),  # wrong kinds, unknown keys
        ("not json", {}),
        ("[1, 2]", {}),
        (None, {}),
    ],
)
def test_what_cannot_be_read_is_passed_over(text, kept):
    assert ConversationSettings.from_json(text).chosen() == kept


def test_the_flags_win_over_them_and_they_over_the_config():
    # temperature from a flag, top_p and max_tokens from the config
    options = ChatOptions(
        sampling=Sampling(temperature=0.9, top_p=0.8), max_tokens=100, flagged={"temperature"}
    )
    own = ConversationSettings(temperature=0.1, top_p=0.5, max_tokens=7, ctx=256)
    chosen = options.for_conversation(own)
    assert chosen.sampling == Sampling(temperature=0.9, top_p=0.5)
    assert (chosen.max_tokens, chosen.ctx) == (7, 256)
    with pytest.raises(OptionsError, match="the conversation's settings: top_p"):
        options.for_conversation(ConversationSettings(top_p=3.0))
