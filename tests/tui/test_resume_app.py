"""Instant resume in the chat app: leaving a conversation (a new chat, another conversation,
quitting) saves its KV cache, and opening it again loads it, so that its next reply prefills
only the new turn (the status bar's reused tokens say so)."""

from __future__ import annotations

import pytest

from llamachat.backends import local
from llamachat.history.store import HistoryStore
from llamachat.kv_files import ContextFiles
from llamachat.tui.widgets.conversation_list import ConversationList
from tests.tui.conftest import app_for, send, settle


@pytest.fixture(autouse=True)
def always(monkeypatch):
    """Saving pays whatever the length: the tiny model prefills far faster than a disk reads."""
    monkeypatch.setattr(local, "MIN_TOKENS", 1)
    monkeypatch.setattr(local, "MIN_GAIN_S", float("-inf"))


def saved(home) -> dict[str, int]:
    return ContextFiles(home.kv).sizes_by_key()


def first_prompt(app, conversation_id: int) -> int:
    """The tokens of the prompt the conversation's first reply answered."""
    messages = HistoryStore(app.home.history_db).get(conversation_id).chat_messages()
    return app.chat.context_use(messages[:1]).used


async def test_a_conversation_left_and_opened_again_resumes_from_its_saved_cache(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
        first = app.conversation_id
        app.action_new_chat()
        await settle(pilot, app)
        assert set(saved(home)) == {str(first)}
        await send(pilot, app, "Something else entirely")
        second = app.conversation_id
        app.open_conversation(first)  # leaves the second: saved; the first is loaded
        await settle(pilot, app)
        assert set(saved(home)) == {str(first), str(second)}
        await send(pilot, app, "And then?")
        # The first exchange's prompt at least, from the file (the session held the second
        # conversation, which shares only the template's first tokens with it); the reply's
        # own tokens only as far as their text tokenizes back into them.
        assert app.status.reused_tokens >= first_prompt(app, first) - 1
    # Quitting saved the first conversation again, with its new turn.
    assert saved(home)[str(first)] > 0


async def test_continuing_in_a_new_app_loads_the_cache_saved_when_the_last_one_quit(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
    assert list(saved(home)) == [str(app.conversation_id)]
    again = app_for(home, continue_latest=True)
    async with again.run_test(size=(110, 36)) as pilot:
        await settle(pilot, again)
        await send(pilot, again, "And then?")
        assert again.status.reused_tokens >= first_prompt(again, again.conversation_id) - 1


async def test_nothing_is_saved_with_a_budget_of_zero(home):
    (home.config / "config.toml").write_text('kv_disk_budget = "0"\n')
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there")
        app.action_new_chat()
        await settle(pilot, app)
    assert saved(home) == {}


async def test_deleting_a_conversation_in_the_app_removes_its_saved_cache(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
        first = app.conversation_id
        app.action_new_chat()  # leaves it: saved
        await settle(pilot, app)
        await send(pilot, app, "Something else entirely")
        assert str(first) in saved(home)
        listing = app.query_one(ConversationList)
        listing.focus()
        listing.highlighted = listing.get_option_index(str(first))
        await pilot.press("f8", "y")
        await settle(pilot, app)
        assert app.conversation_id is not None  # the open one stays open
        assert str(first) not in saved(home)


async def test_deleting_the_open_conversation_saves_no_cache_for_it(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
        deleted = app.conversation_id
        await pilot.press("f8", "y")
        await settle(pilot, app)
        assert app.conversation_id is None
    assert str(deleted) not in saved(home)  # nor did quitting save it


async def test_switching_model_saves_the_conversations_cache_for_switching_back(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
        await pilot.press("ctrl+l")
        await settle(pilot, app)  # the models are listed on a thread
        choices = app.screen.query_one("#choices")
        choices.highlighted = choices.get_option_index("tiny-mqa")
        await pilot.press("enter")
        await settle(pilot, app)
        assert app.model_name == "tiny-mqa"
        assert set(saved(home)) == {str(app.conversation_id)}  # tiny's, left
        app._switch_model("tiny")  # what the model picker does
        await settle(pilot, app)
        await send(pilot, app, "And then?")
        assert app.status.reused_tokens >= first_prompt(app, app.conversation_id) - 1


async def test_a_conversation_deleted_elsewhere_while_open_leaves_no_cache_when_left(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
        deleted = app.conversation_id
        HistoryStore(home.history_db).delete(deleted)  # `llamachat history rm` in a terminal
        app.action_new_chat()  # leaves it: its cache would be saved for nothing
        await settle(pilot, app)
        assert str(deleted) not in saved(home)


async def test_a_conversation_deleted_elsewhere_while_open_leaves_no_cache_on_quitting(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there, tell me about foxes")
        deleted = app.conversation_id
        HistoryStore(home.history_db).delete(deleted)
    assert str(deleted) not in saved(home)
