"""Pinned pictures of the main screen, the help screen and a themed screen (pytest-textual-
snapshot; `pytest --snapshot-update` rewrites them after a deliberate change)."""

from __future__ import annotations

import pytest

from llamachat.history.store import HistoryStore
from llamachat.tui.widgets.prompt_input import PromptInput
from tests.tui.conftest import app_for, settle

SIZE = (110, 34)


def pinned_app(home, **changes):
    """int8 weights: a status bar that reads the same on every CPU (auto depends on fbgemm)."""
    return app_for(home, continue_latest=True, quantize="int8", **changes)


@pytest.fixture
def conversation_home(home):
    history = HistoryStore(home.history_db)
    older = history.create(model="tiny")
    history.add_message(older, "user", "长城有多长？")
    history.add_message(older, "assistant", "About 21,000 km.")
    latest = history.create(model="tiny", system_prompt="You are a concise assistant.")
    history.add_message(latest, "user", "How do I reverse a list in Python?")
    history.add_message(
        latest,
        "assistant",
        "Use slicing or `reverse()`:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])\n```\n\n"
        "- `items[::-1]` makes a **new** list\n- `items.reverse()` changes it in place",
    )
    history.add_message(latest, "user", "And a tuple?")
    stopped = history.start_reply(latest, "tiny")
    history.finish_reply(stopped, "Tuples have no `reverse()`, but", "interrupted")
    return home


async def _ready(pilot) -> None:
    await settle(pilot, pilot.app)
    # A blinking cursor would make the picture depend on the moment it is taken.
    pilot.app.query_one(PromptInput).cursor_blink = False
    await pilot.pause()


def test_main_screen(snap_compare, conversation_home):
    app = pinned_app(conversation_home)
    assert snap_compare(app, terminal_size=SIZE, run_before=_ready)


def test_help_screen(snap_compare, conversation_home):
    async def open_help(pilot):
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    app = pinned_app(conversation_home)
    assert snap_compare(app, terminal_size=SIZE, run_before=open_help)


def test_high_contrast_theme(snap_compare, conversation_home):
    app = pinned_app(conversation_home, theme="high-contrast")
    assert snap_compare(app, terminal_size=SIZE, run_before=_ready)
