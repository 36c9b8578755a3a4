"""A reply that did not end by itself says why on the message: stopped, cut by the token limit or
by the full context (with a notice saying what to do), failed."""

from __future__ import annotations

from llamachat.history.store import HistoryStore
from llamachat.tui.widgets.chat_view import ChatView, ReplyTurn
from llamachat.tui.widgets.prompt_input import PromptInput
from tests.tui.conftest import app_for, settle
from tests.tui.screen import on_screen


def last_reply(app) -> ReplyTurn:
    reply = app.query_one(ChatView).last(ReplyTurn)
    assert reply is not None
    return reply


async def ask(pilot, app, text: str) -> None:
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await settle(pilot, app)


async def test_a_stopped_reply_shows_stopped_on_the_message(home):
    app = app_for(home, max_tokens=900)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        app.query_one(PromptInput).text = "Tell me everything"
        await pilot.press("enter", "escape")
        await settle(pilot, app)
        assert last_reply(app).border_subtitle == "stopped"
        status_bar = app.query_one("#status").region.y
        marked = [line for y, line in enumerate(on_screen(app)) if "stopped" in line]
        assert marked and marked != [status_bar]  # on the message, not only in the status bar


async def test_a_reply_cut_by_the_token_limit_says_so_on_the_message(home):
    app = app_for(home, max_tokens=5)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await ask(pilot, app, "Hello")
        reply = HistoryStore(home.history_db).get(app.conversation_id).messages[-1]
        assert reply.generated_tokens == 5  # the tiny model does not end by itself this soon
        assert last_reply(app).border_subtitle == "cut: token limit"
        assert last_reply(app).has_class("cut")
        assert any("cut: token limit" in row for row in on_screen(app))
        assert not any("context" in str(n.message) for n in app._notifications)


async def test_a_reply_cut_by_the_full_context_says_so_and_what_to_do(home):
    app = app_for(home, max_tokens=None, ctx=64)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await ask(pilot, app, "Hello")
        assert last_reply(app).border_subtitle == "cut: context full"
        assert any("cut: context full" in row for row in on_screen(app))
        (notice,) = [str(n.message) for n in app._notifications if "context" in str(n.message)]
        assert "64" in notice and "ctrl+n" in notice.lower() and "--ctx" in notice


async def test_a_reply_that_ends_by_itself_has_no_marker(home):
    app = app_for(home, max_tokens=5)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await ask(pilot, app, "Hello")
        stats = app.status
        assert stats.tokens_per_s is not None
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Hi")
    history.add_message(conversation, "assistant", "Hello!")
    again = app_for(home, continue_latest=True)
    async with again.run_test() as pilot:
        await settle(pilot, again)
        assert last_reply(again).border_subtitle == ""
        assert not last_reply(again).has_class("marked")


async def test_a_conversation_opened_again_shows_its_markers(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "First")
    stopped = history.start_reply(conversation, "tiny")
    history.finish_reply(stopped, "Half an answ", "interrupted")
    history.add_message(conversation, "user", "Second")
    failed = history.start_reply(conversation, "tiny")
    history.finish_reply(failed, "", "error")
    app = app_for(home, continue_latest=True)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        replies = [t for t in app.query_one(ChatView).turns() if isinstance(t, ReplyTurn)]
        assert [r.border_subtitle for r in replies] == ["stopped", "failed"]
        screen = "\n".join(on_screen(app))
        assert "stopped" in screen and "failed" in screen


def test_the_marker_follows_the_stored_status_and_finish_reason():
    # What the history holds once it records limits: status "length", the engine's reason.
    assert ReplyTurn("a", 1, "length", "length").border_subtitle == "cut: token limit"
    assert ReplyTurn("a", 1, "length", "context").border_subtitle == "cut: context full"
    assert ReplyTurn("a", 1, "length").border_subtitle == "cut: limit reached"
    assert ReplyTurn("a", 1, "interrupted", "cancelled").border_subtitle == "stopped"
    assert ReplyTurn("a", 1, "complete", "stop").border_subtitle == ""
