"""Pinned pictures of the main screen, the help screen and the system prompt dialog, at 80x24 and
120x40, and of a themed screen (pytest-textual-snapshot; `pytest --snapshot-update` rewrites them
after a deliberate change)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from llamachat.history.store import HistoryStore
from llamachat.tui.widgets.prompt_input import PromptInput
from tests.tui.conftest import app_for, settle

SIZES = {"80x24": (80, 24), "120x40": (120, 40)}

POEM = "The sea is wide,\nthe sea is deep,\nit keeps the secrets\nthat sailors keep."
CODE_REPLY = (
    "Use slicing or `reverse()`:\n\n"
    "```python\n"
    "items = [1, 2, 3]\n"
    "print(items[::-1])  # a new list; the original, and whatever else refers to it, is unchanged\n"
    "```\n\n"
    "- `items[::-1]` makes a **new** list\n"
    "- `items.reverse()` changes it in place"
)


def pinned_app(home, **changes):
    """int8 weights: a status bar that reads the same on every CPU (auto depends on fbgemm)."""
    return app_for(home, continue_latest=True, quantize="int8", **changes)


@pytest.fixture
def conversation_home(home, monkeypatch):
    """Four conversations at fixed times (shown in UTC), the latest with a poem, a code block
    and a stopped reply."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    history = HistoryStore(home.history_db)
    times = {}
    for model, when in [("tiny", "2024-03-04T09:15"), ("tiny-mqa", "2024-03-05T16:40")]:
        said = history.create(model=model)
        history.add_message(said, "user", "Say OK.")
        history.add_message(said, "assistant", "OK.")
        times[said] = when
    great_wall = history.create(model="tiny")
    history.add_message(great_wall, "user", "长城有多长？")
    history.add_message(great_wall, "assistant", "About 21,000 km.")
    times[great_wall] = "2024-03-06T11:05"
    latest = history.create(model="tiny", system_prompt="You are a concise assistant.")
    history.add_message(latest, "user", "A short poem about the sea, please.")
    history.add_message(latest, "assistant", POEM)
    history.add_message(latest, "user", "How do I reverse a list in Python?")
    history.add_message(latest, "assistant", CODE_REPLY)
    history.add_message(latest, "user", "And a tuple?")
    stopped = history.start_reply(latest, "tiny")
    history.finish_reply(stopped, "Tuples have no `reverse()`, but", "interrupted")
    times[latest] = "2024-03-07T08:30"
    with sqlite3.connect(home.history_db) as db:
        for conversation, when in times.items():
            stamp = f"{when}:00.000000+00:00"
            db.execute(
                "UPDATE conversations SET created_at = ?, updated_at = ? WHERE id = ?",
                (stamp, stamp, conversation),
            )
    yield home
    monkeypatch.delenv("TZ")
    time.tzset()


async def _ready(pilot) -> None:
    await settle(pilot, pilot.app)
    # A blinking cursor would make the picture depend on the moment it is taken.
    pilot.app.query_one(PromptInput).cursor_blink = False
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_main_screen(snap_compare, conversation_home, size):
    app = pinned_app(conversation_home)
    assert snap_compare(app, terminal_size=size, run_before=_ready)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_help_screen(snap_compare, conversation_home, size):
    async def open_help(pilot):
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    app = pinned_app(conversation_home)
    assert snap_compare(app, terminal_size=size, run_before=open_help)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_system_prompt_dialog(snap_compare, conversation_home, size):
    async def open_dialog(pilot):
        await _ready(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()
        pilot.app.screen.query_one("#prompt").cursor_blink = False
        await pilot.pause()

    app = pinned_app(conversation_home)
    assert snap_compare(app, terminal_size=size, run_before=open_dialog)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_conversation_settings_panel(snap_compare, conversation_home, size):
    """The latest conversation's own context, temperature and system prompt, filled in."""
    with sqlite3.connect(conversation_home.history_db) as db:  # its time kept as it is
        db.execute(
            "UPDATE conversations SET settings = ? WHERE id = 4",
            ('{"ctx": 512, "temperature": 0.3}',),
        )

    async def open_panel(pilot):
        await _ready(pilot)
        await pilot.press("ctrl+o")
        await settle(pilot, pilot.app)  # the models are listed first
        for field in pilot.app.screen.query("Input, TextArea"):
            field.cursor_blink = False
        await pilot.pause()

    app = pinned_app(conversation_home)
    assert snap_compare(app, terminal_size=size, run_before=open_panel)


def test_high_contrast_theme(snap_compare, conversation_home):
    """With a context filling up, so that the meter shows its warning colour."""
    app = pinned_app(conversation_home, theme="high-contrast", ctx=512)
    assert snap_compare(app, terminal_size=SIZES["120x40"], run_before=_ready)


@pytest.fixture
def branched_home(home, monkeypatch):
    """A conversation whose first reply was regenerated twice (‹3/3›) and whose second question
    was edited once (‹2/2›)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny", title="Branches")
    history.add_message(conversation, "user", "Name a colour.")
    for colour in ("Red.", "Green.", "Blue."):
        reply = history.add_message(conversation, "assistant", colour)
        if colour != "Blue.":
            history.branch_from(reply)
    question = history.add_message(conversation, "user", "Another one?")
    history.add_message(conversation, "assistant", "Yellow.")
    history.branch_from(question)
    history.add_message(conversation, "user", "And one more?")
    history.add_message(conversation, "assistant", "Purple.")
    stamp = "2024-03-07T08:30:00.000000+00:00"
    with sqlite3.connect(home.history_db) as db:
        db.execute("UPDATE conversations SET created_at = ?, updated_at = ?", (stamp, stamp))
    yield home
    monkeypatch.delenv("TZ")
    time.tzset()


def test_branch_markers_and_a_selected_message(snap_compare, branched_home):
    async def select_the_first_reply(pilot):
        await _ready(pilot)
        await pilot.press("f6", "up", "up", "up")
        await pilot.pause()

    app = pinned_app(branched_home)
    assert snap_compare(app, terminal_size=SIZES["80x24"], run_before=select_the_first_reply)
