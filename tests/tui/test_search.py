"""Ctrl+F: search every conversation, and open one at the very message found."""

from __future__ import annotations

from llamachat.history.store import HistoryStore
from llamachat.tui.screens.search import SearchScreen
from llamachat.tui.widgets.chat_view import ChatView
from tests.tui.conftest import app_for, settle
from tests.tui.screen import on_screen


def long_conversation(home, needle_at: int, turns: int = 30) -> tuple[int, int]:
    """A conversation of `turns` exchanges, the needle in the question of exchange `needle_at`;
    returns the conversation and that message."""
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    needle = None
    for index in range(turns):
        question = f"Question {index} about zebras" if index == needle_at else f"Question {index}"
        message = history.add_message(conversation, "user", question)
        needle = message if index == needle_at else needle
        history.add_message(conversation, "assistant", f"Answer {index}")
    assert needle is not None
    other = history.create(model="tiny")
    history.add_message(other, "user", "Something else")
    return conversation, needle


async def search(pilot, app, text: str) -> SearchScreen:
    await pilot.press("ctrl+f")
    assert isinstance(app.screen, SearchScreen)
    await pilot.press(*text)
    await pilot.pause()
    return app.screen


async def test_opening_a_hit_shows_that_message_highlighted(home):
    conversation, needle = long_conversation(home, needle_at=3)
    app = app_for(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await search(pilot, app, "zebras")
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.conversation_id == conversation
        chat = app.query_one(ChatView)
        (found,) = [turn for turn in chat.turns() if turn.has_class("found")]
        assert found.message_id == needle
        assert chat.region.contains_region(found.region)  # on screen, not scrolled past
        assert any("Question 3 about zebras" in row for row in on_screen(app))


async def test_a_hit_on_another_branch_opens_that_branch(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Name an animal")
    reply = history.add_message(conversation, "assistant", "A zebra.")
    history.branch_from(reply)  # regenerated: the zebra is on a branch the path left
    history.add_message(conversation, "assistant", "A lion.")
    app = app_for(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await search(pilot, app, "zebra")
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.conversation_id == conversation
        (found,) = [t for t in app.query_one(ChatView).turns() if t.has_class("found")]
        assert found.message_id == reply
        assert history.get(conversation).active_leaf == reply  # what the model sees next


async def test_one_down_from_the_query_picks_the_first_result(home):
    conversation, needle = long_conversation(home, needle_at=20)
    app = app_for(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        screen = await search(pilot, app, "zebras")
        await pilot.press("down")
        results = screen.query_one("#results")
        assert results.has_focus and results.highlighted == 0
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.conversation_id == conversation
        (found,) = [t for t in app.query_one(ChatView).turns() if t.has_class("found")]
        assert found.message_id == needle


async def test_a_search_without_hits_says_no_matches(home):
    long_conversation(home, needle_at=3, turns=4)
    app = app_for(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await search(pilot, app, "okapi")
        assert any("no matches" in row for row in on_screen(app))
        await pilot.press("backspace", "backspace", "backspace", "backspace", "backspace")
        await pilot.press(*"zebra")
        await pilot.pause()
        assert not any("no matches" in row for row in on_screen(app))


async def test_many_hits_scroll_inside_the_box_at_80x24(home):
    history = HistoryStore(home.history_db)
    for index in range(40):
        conversation = history.create(model="tiny")
        history.add_message(conversation, "user", f"zebras {index}")
    app = app_for(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = await search(pilot, app, "zebras")
        box, results = screen.query_one("Vertical"), screen.query_one("#results")
        assert results.option_count == 40
        assert app.screen.region.contains_region(box.region)
        assert box.region.contains_region(results.region)
