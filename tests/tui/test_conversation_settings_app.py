"""Ctrl+O: the conversation's own settings, set in the app, kept with it, used for its replies
under the flags."""

from __future__ import annotations

from textual.widgets import Input, Label

from llamachat.history.conversation_settings import ConversationSettings
from llamachat.history.store import HistoryStore
from llamachat.tui.screens.conversation_settings import ConversationSettingsScreen
from tests.tui.conftest import app_for, send, settle


def stored(app):
    return HistoryStore(app.home.history_db).get(app.conversation_id)


async def fill(pilot, app, **values: str) -> None:
    await pilot.press("ctrl+o")
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, ConversationSettingsScreen)
    for name, value in values.items():
        screen.query_one(f"#{name}", Input).value = value
    screen.query_one("#max_tokens", Input).focus()
    await pilot.press("enter")
    await pilot.pause()


async def test_settings_set_before_the_first_message_go_with_the_conversation(home):
    app = app_for(home)  # greedy, 12 tokens a reply
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await fill(pilot, app, max_tokens="3", top_k="5")
        assert not isinstance(app.screen, ConversationSettingsScreen)
        await send(pilot, app, "Hello")
        conversation = stored(app)
        assert conversation.settings == ConversationSettings(top_k=5, max_tokens=3)
        assert conversation.messages[-1].generated_tokens == 3
        await pilot.press("ctrl+o")
        await pilot.pause()
        hint = str(app.screen.query_one("#elsewhere", Label).render())
        assert "Ctrl+L (tiny)" in hint and f"history set {conversation.id} --ctx" in hint
        await pilot.press("escape")
        await pilot.pause()
        await fill(pilot, app, max_tokens="")  # blank: the default again
        await send(pilot, app, "More")
        assert stored(app).settings.chosen() == {"top_k": 5}
        assert stored(app).messages[-1].generated_tokens == 12


async def test_a_flag_wins_over_the_conversations_own(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.set_settings(conversation, ConversationSettings(max_tokens=3))
    app = app_for(home, continue_latest=True, max_tokens=5, flagged=frozenset({"max_tokens"}))
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        assert stored(app).messages[-1].generated_tokens == 5


async def test_a_bad_value_is_said_and_nothing_is_kept(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await fill(pilot, app, top_p="1.5")
        screen = app.screen
        assert isinstance(screen, ConversationSettingsScreen)  # still open
        assert "top_p must be in (0, 1]" in str(screen.query_one("#problem", Label).render())
        await fill_again(pilot, screen, top_p="lots")
        assert "'lots' is not a number" in str(screen.query_one("#problem", Label).render())
        await pilot.press("escape")
        assert stored(app).settings == ConversationSettings()


async def fill_again(pilot, screen, **values: str) -> None:
    for name, value in values.items():
        screen.query_one(f"#{name}", Input).value = value
    await pilot.press("enter")
    await pilot.pause()
