"""Ctrl+O: the conversation's own settings (its model, context, system prompt, sampling, reply
length), set in the app, kept with it, used for its replies under the flags."""

from __future__ import annotations

from textual.widgets import Input, Label, Select, TextArea

from llamachat.backends import local
from llamachat.history.conversation_settings import ConversationSettings
from llamachat.history.export import to_markdown
from llamachat.history.store import HistoryStore
from llamachat.kv_files import ContextFiles
from llamachat.tui.screens.conversation_settings import ConversationSettingsScreen
from tests.tui.conftest import app_for, send, settle


def stored(app):
    return HistoryStore(app.home.history_db).get(app.conversation_id)


async def open_panel(pilot, app) -> ConversationSettingsScreen:
    await pilot.press("ctrl+o")
    await settle(pilot, app)  # the models are listed on a thread first
    screen = app.screen
    assert isinstance(screen, ConversationSettingsScreen)
    return screen


async def fill(pilot, app, model: str | None = None, system_prompt: str | None = None, **values):
    """Open the panel, set what is given and apply it (Enter in a number)."""
    screen = await open_panel(pilot, app)
    if model is not None:
        screen.query_one("#model", Select).value = model
    if system_prompt is not None:
        screen.query_one("#system_prompt", TextArea).text = system_prompt
    for name, value in values.items():
        screen.query_one(f"#{name}", Input).value = value
    screen.query_one("#max_tokens", Input).focus()
    await pilot.press("enter")
    await settle(pilot, app)


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
        screen = await open_panel(pilot, app)
        assert screen.query_one("#model", Select).value == "tiny"  # the open one
        assert screen.query_one("#top_k", Input).value == "5"
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
        await fill_again(pilot, screen, top_p="", ctx="8")
        assert "16 tokens or more" in str(screen.query_one("#problem", Label).render())
        await fill_again(pilot, screen, ctx="2k")
        assert "'2k' is not a whole number" in str(screen.query_one("#problem", Label).render())
        await pilot.press("escape")
        assert stored(app).settings == ConversationSettings()


async def fill_again(pilot, screen, **values: str) -> None:
    for name, value in values.items():
        screen.query_one(f"#{name}", Input).value = value
    await pilot.press("enter")
    await pilot.pause()


async def test_the_system_prompt_set_in_the_panel_is_the_conversations(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await fill(pilot, app, system_prompt="You are a pirate.")
        assert stored(app).system_prompt == "You are a pirate."
        assert "## System prompt\n\nYou are a pirate." in to_markdown(stored(app))  # history show
        screen = await open_panel(pilot, app)
        assert screen.query_one("#system_prompt", TextArea).text == "You are a pirate."


async def test_a_model_chosen_in_the_panel_is_opened_as_ctrl_l_opens_it(home, monkeypatch):
    monkeypatch.setattr(local, "MIN_TOKENS", 1)  # saving pays, however short: as Ctrl+L saves
    monkeypatch.setattr(local, "MIN_GAIN_S", float("-inf"))
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await fill(pilot, app, model="tiny-mqa")
        assert app.model_name == "tiny-mqa" and app.chat.model.config.n_kv_heads == 1
        assert stored(app).summary.model == "tiny-mqa"
        assert str(app.conversation_id) in ContextFiles(home.kv).sizes_by_key()  # tiny's, left


async def test_a_context_set_in_the_panel_opens_the_model_again_with_it(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await fill(pilot, app, ctx="64")
        assert app.chat.info.context_size == 64
        assert stored(app).settings.ctx == 64
        assert "ctx 64" in to_markdown(stored(app))  # history show
        before = app.chat
        await fill(pilot, app, temperature="0.5")  # the context is as it was: not opened again
        assert app.chat is before


async def test_a_context_larger_than_the_models_is_said_and_nothing_is_kept(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        most = app.chat.info.context_length
        before = app.chat
        await fill(pilot, app, ctx=str(most + 1))
        screen = app.screen
        assert isinstance(screen, ConversationSettingsScreen)  # still open
        problem = str(screen.query_one("#problem", Label).render())
        assert f"at most {most:,} tokens" in problem
        await pilot.press("escape")
        assert app.chat is before and app.new_settings == ConversationSettings()


async def test_a_ctx_flag_wins_over_the_one_set_in_the_panel(home):
    app = app_for(home, ctx=128, flagged=frozenset({"ctx"}))
    async with app.run_test() as pilot:
        await settle(pilot, app)
        before = app.chat
        await fill(pilot, app, ctx="64")
        assert app.chat is before and app.chat.info.context_size == 128
        assert app.new_settings.ctx == 64  # kept for the conversation, for a run without --ctx
        assert any("--ctx" in str(n.message) for n in app._notifications)


async def test_continuing_opens_the_conversations_own_model_and_context(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny-mqa")
    history.add_message(conversation, "user", "Hi")
    history.set_settings(conversation, ConversationSettings(ctx=64))
    app = app_for(home, model=None, continue_latest=True)  # no -m: `llamachat -c`
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.model_name == "tiny-mqa" and app.chat.info.context_size == 64


async def test_with_no_model_open_the_panel_opens_none_unless_one_is_chosen(home):
    app = app_for(home, model="missing")  # not installed: no model opens
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.chat is None
        await fill(pilot, app, temperature="0.5")
        assert app.chat is None and app.new_settings == ConversationSettings(temperature=0.5)
        await fill(pilot, app, model="tiny")
        assert app.model_name == "tiny" and app.chat is not None


async def test_only_the_context_of_the_conversation_opened_with_stays_with_the_model(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Hi")
    history.set_settings(conversation, ConversationSettings(max_tokens=3, ctx=64))
    app = app_for(home, continue_latest=True)  # the model opens for it: its ctx
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.chat.info.context_size == 64
        app.action_new_chat()
        await send(pilot, app, "Hello")  # a conversation of its own: the defaults' 12 tokens
        assert stored(app).messages[-1].generated_tokens == 12
