"""The chat app's layout in small and large terminals, driven with the Pilot against real tiny
models: the status bar, the dialogs at 80x24, the sidebar, replies' Markdown, focus and keys."""

from __future__ import annotations

import inspect
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from textual import on
from textual.color import Color
from textual.widgets import Button, Label, Markdown
from textual.widgets.markdown import MarkdownFence

from llamachat.history.store import HistoryStore
from llamachat.tui import LlamaChatApp, make_app
from llamachat.tui.messages import ReplyPiece, ReplyStarted
from llamachat.tui.screens.help import HelpScreen
from llamachat.tui.screens.system_prompt import SystemPromptScreen
from llamachat.tui.widgets.chat_view import ChatView, ReplyTurn
from llamachat.tui.widgets.conversation_list import ConversationList
from llamachat.tui.widgets.prompt_input import PromptInput
from llamachat.tui.widgets.status_bar import Status, StatusBar, status_text
from tests.tui.conftest import app_for, options, palette_titles, settle

SMALL = (80, 24)
LARGE = (120, 40)
SHIPPED_THEMES = ["llamachat-dark", "llamachat-light", "high-contrast", "campfire"]


def bar_text(app) -> str:
    bar = app.query_one(StatusBar)
    text = str(bar.render())
    assert len(text) <= bar.size.width, f"{text!r} is cut at {bar.size.width} columns"
    return text


class StoppingApp(LlamaChatApp):
    """The app as it is, stopping each reply after a few pieces the way Esc does (through the
    reply's cancel event), but from the worker's side: a tiny model can write 900 tokens before
    a key press is handled on a busy machine. It also notes the status bar at every piece."""

    CSS_PATH = Path(inspect.getfile(LlamaChatApp)).with_name("app.tcss")  # not beside this file
    STOP_AFTER = 4  # pieces: a few tokens, so that the reply has a speed

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pieces = 0
        self.status_while_writing: list[tuple[str, int]] = []  # (text, width)

    def post_message(self, message) -> bool:
        # Runs in the worker thread for what the worker posts.
        if isinstance(message, ReplyStarted):
            self.pieces = 0
        elif isinstance(message, ReplyPiece):
            self.pieces += 1
            if self.pieces == self.STOP_AFTER:
                self.cancel.set()
        return super().post_message(message)

    @on(ReplyPiece)
    def note_status(self) -> None:
        if self.generating:
            bar = self.query_one(StatusBar)
            self.status_while_writing.append((str(bar.render()), bar.size.width))


def stopping_app(home) -> StoppingApp:
    return make_app(home, options(max_tokens=900), StoppingApp)


async def stopped_reply(pilot, app, text: str = "Tell me everything") -> None:
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")
    await settle(pilot, app)
    assert app.status.note == "stopped"


# The status bar


async def test_while_a_reply_streams_the_status_bar_says_so_not_the_last_replys_speed(home):
    app = stopping_app(home)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        await stopped_reply(pilot, app)
        assert "tok/s" in bar_text(app)
        app.status_while_writing.clear()
        await stopped_reply(pilot, app, "And again")
        assert app.status_while_writing, "no piece of the reply was shown while it was written"
        for writing, width in app.status_while_writing:
            assert len(writing) <= width and "writing" in writing
            assert "tok/s" not in writing and "TTFT" not in writing and "reused" not in writing
        assert "stopped" in bar_text(app) and "tok/s" in bar_text(app)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "120x40"])
async def test_the_status_bar_fits_the_terminal_and_keeps_the_state_and_the_context(home, size):
    app = stopping_app(home)
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app)
        await stopped_reply(pilot, app)
        text = bar_text(app)
        assert text.startswith("tiny · ") and "stopped" in text and "ctx " in text
        if size == LARGE:
            for part in ("cpu float32", "░", "TTFT", "tok/s", "reused"):
                assert part in text


async def test_the_status_bar_is_laid_out_again_when_the_terminal_is_resized(home):
    app = stopping_app(home)
    async with app.run_test(size=LARGE) as pilot:
        await settle(pilot, app)
        await stopped_reply(pilot, app)
        assert "░" in bar_text(app)  # the meter's bar: the first thing to go when space is short
        await pilot.resize_terminal(*SMALL)
        await pilot.pause()
        assert "░" not in bar_text(app) and "stopped" in bar_text(app)
        await pilot.resize_terminal(*LARGE)
        await pilot.pause()
        assert "░" in bar_text(app)


def full_status(**changes) -> Status:
    values = dict(
        model="smollm2-1.7b",
        device="cuda:0 bfloat16 int4",
        context_used=8000,
        context_size=8192,
        dropped=3,
        time_to_first_token_ms=123.4,
        tokens_per_s=45.67,
        reused_tokens=7000,
        note="stopped",
    )
    return Status(**{**values, **changes})


def test_the_status_line_gives_up_what_matters_least_first():
    status = full_status()
    everything = (
        "smollm2-1.7b · cuda:0 bfloat16 int4 · ctx 8000/8192 ██████████ · "
        "3 oldest messages unseen · TTFT 123 ms · 45.7 tok/s · reused 7000 · stopped"
    )
    assert status_text(status, 200).plain == everything
    assert status_text(status, len(everything)).plain == everything
    steps = [
        # the meter's bar, then a shorter device, a shorter note about unseen turns
        "smollm2-1.7b · cuda:0 bf16 int4 · ctx 8000/8192 · 3 unseen · TTFT 123 ms · 45.7 tok/s"
        " · reused 7000 · stopped",
        # then the reused tokens, the time to first token, the device, the speed
        "smollm2-1.7b · cuda:0 bf16 int4 · ctx 8000/8192 · 3 unseen · 45.7 tok/s · stopped",
        "smollm2-1.7b · ctx 8000/8192 · 3 unseen · 45.7 tok/s · stopped",
        "smollm2-1.7b · ctx 8000/8192 · 3 unseen · stopped",
    ]
    for step in steps:
        assert status_text(status, len(step)).plain == step
    # then the unseen turns (the meter's colour says so too), and the model's name is shortened
    assert status_text(status, 40).plain == "smollm2-1.7b · ctx 8000/8192 · stopped"
    long_name = full_status(model="hf-HuggingFaceTB-SmolLM2-360M-Instruct")
    assert status_text(long_name, 44).plain == "hf-HuggingFaceTB-… · ctx 8000/8192 · stopped"
    # and when even that does not fit, the line is cut at the end
    assert status_text(status, 20).plain == "smollm2… · ctx 8000…"


def test_the_status_line_never_shows_what_it_does_not_know():
    assert status_text(Status(model="tiny", note="loading…"), 80).plain == "tiny · loading…"


# The context meter's colour


def meter_colours(app) -> tuple[Color, Color]:
    """The background and the text colour of the context meter, as the terminal shows them."""
    bar = app.query_one(StatusBar)
    (segment,) = [s for s in bar.render_line(0) if "ctx" in s.text]
    return Color.from_rich_color(segment.style.bgcolor), Color.from_rich_color(segment.style.color)


def contrast(one: Color, other: Color) -> float:
    """WCAG contrast ratio: 1 (the same) to 21 (black on white)."""
    high, low = sorted([_luminance(one), _luminance(other)], reverse=True)
    return (high + 0.05) / (low + 0.05)


def _luminance(colour: Color) -> float:
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = colour.rgb
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


@pytest.mark.parametrize("theme", SHIPPED_THEMES)
async def test_the_context_meter_warns_when_nearly_full_and_alarms_when_full(home, theme):
    app = app_for(home, theme=theme)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        variables = app.get_css_variables()  # the theme's colours, as Textual derives them
        warning, error = Color.parse(variables["warning"]), Color.parse(variables["error"])
        app.show_status(context_used=100, context_size=512)
        await pilot.pause()
        calm, _ = meter_colours(app)
        assert calm not in (warning, error)
        for used, dropped, expected in [(400, 0, warning), (512, 0, error), (100, 2, error)]:
            app.show_status(context_used=used, context_size=512, dropped=dropped)
            await pilot.pause()
            background, text = meter_colours(app)
            assert background == expected, (used, dropped)
            assert contrast(background, text) >= 4.5, (used, dropped)


# Dialogs and the sidebar in small terminals


def inside(widget, outer) -> bool:
    return outer.region.contains_region(widget.region)


async def test_at_80x24_the_help_list_fits_and_scrolls_to_its_last_key(home):
    app = app_for(home)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        keys = app.screen.query_one("#keys")
        box = keys.parent
        assert inside(box, app.screen) and inside(keys, box)
        assert keys.max_scroll_y > 0, "the list fits whole: make the test's terminal smaller"
        await pilot.press("end")
        await pilot.pause()
        assert keys.scroll_y == keys.max_scroll_y
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "120x40"])
async def test_the_system_prompt_dialog_shows_its_buttons_and_an_editor(home, size):
    app = app_for(home)
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SystemPromptScreen)
        box = app.screen.query_one("#prompt").parent.parent
        assert inside(box, app.screen)
        for button in app.screen.query(Button):
            assert inside(button, box), button.id
        assert app.screen.query_one("#prompt").size.height >= 3
        await pilot.click("#cancel")
        assert not isinstance(app.screen, SystemPromptScreen)


async def test_f9_hides_and_shows_the_sidebar(home):
    app = app_for(home)
    async with app.run_test(size=LARGE) as pilot:
        await settle(pilot, app)
        listing = app.query_one(ConversationList)
        chat = app.query_one(ChatView)
        assert listing.display
        wide = chat.size.width
        listing.focus()
        await pilot.press("f9")
        await pilot.pause()
        assert not listing.display and chat.size.width > wide
        assert app.query_one(PromptInput).has_focus
        await pilot.press("f9")
        await pilot.pause()
        assert listing.display and chat.size.width == wide
        palette = await palette_titles(pilot, app, "Show or hide the conversations")
        assert "Show or hide the conversations" in palette


async def test_the_sidebar_folds_away_in_a_narrow_terminal_unless_the_user_decided(home):
    app = app_for(home)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        listing = app.query_one(ConversationList)
        assert not listing.display
        await pilot.resize_terminal(*LARGE)
        await pilot.pause()
        assert listing.display
        await pilot.press("f9")  # hidden by the user: it stays hidden at every width
        await pilot.resize_terminal(*SMALL)
        await pilot.pause()
        await pilot.resize_terminal(*LARGE)
        await pilot.pause()
        assert not listing.display
        await pilot.resize_terminal(*SMALL)
        await pilot.press("f9")  # shown by the user in a narrow terminal: it stays
        await pilot.pause()
        assert listing.display
        await pilot.resize_terminal(79, 24)
        await pilot.pause()
        assert listing.display


# Replies: code blocks and line breaks

LONG_LINE = (
    "print(items[::-1])  # a new list; the original, and whatever else refers to it, is unchanged"
)
CODE_REPLY = f"Like this:\n\n```python\nitems = [1, 2, 3]\n{LONG_LINE}\n```\n\nDone."
POEM = "The sea is wide,\nthe sea is deep,\nit keeps the secrets\nthat sailors keep."


def shown_lines(widget) -> list[str]:
    """The widget's lines as the terminal shows them, without the trailing blanks."""
    return [widget.render_line(y).text.rstrip() for y in range(widget.size.height)]


async def show_reply(pilot, app, markdown: str, streamed: bool = False) -> ReplyTurn:
    """A reply in the chat view, whole or streamed in small pieces as the app streams one."""
    turn = ReplyTurn("" if streamed else markdown)
    await app.query_one(ChatView).mount(turn)
    if streamed:
        stream = Markdown.get_stream(turn)
        for start in range(0, len(markdown), 3):
            await stream.write(markdown[start : start + 3])
            await pilot.pause()
        await stream.stop()
    await pilot.pause()
    return turn


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_code_block_has_a_frame_its_language_and_wraps_its_long_lines(home, streamed):
    app = app_for(home)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        turn = await show_reply(pilot, app, CODE_REPLY, streamed)
        (fence,) = turn.query(MarkdownFence)
        assert fence.styles.border_top[0] not in ("", "none", "hidden")
        assert fence.border_title == "python"
        assert fence.styles.background != turn.styles.background
        chat = app.query_one(ChatView)
        assert chat.content_region.contains_region(fence.region)
        assert fence.max_scroll_x == 0  # nothing hidden to the right
        code = shown_lines(fence.query_one(Label))
        assert "".join(LONG_LINE.split()) in "".join("".join(code).split())
        assert "items = [1, 2, 3]" in "\n".join(code)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_single_newlines_in_a_reply_are_line_breaks(home, streamed):
    app = app_for(home)
    reply = f"{POEM}\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n{CODE_REPLY}"
    async with app.run_test(size=LARGE) as pilot:
        await settle(pilot, app)
        turn = await show_reply(pilot, app, reply, streamed)
        poem = turn.query("MarkdownParagraph").first()
        assert [line.strip() for line in shown_lines(poem)] == POEM.splitlines()
        assert len(turn.query("MarkdownBullet")) == 2
        assert len(turn.query("MarkdownTable")) == 1
        (fence,) = turn.query(MarkdownFence)
        assert fence.code == f"items = [1, 2, 3]\n{LONG_LINE}"


# The sidebar's entries, scrolling from the editor, the chat pane's focus


def pin_times(home, times: dict[int, datetime]) -> None:
    with sqlite3.connect(home.history_db) as db:
        for conversation, when in times.items():
            stamp = when.astimezone(UTC).isoformat(timespec="microseconds")
            db.execute(
                "UPDATE conversations SET created_at = ?, updated_at = ? WHERE id = ?",
                (stamp, stamp, conversation),
            )


async def test_each_sidebar_entry_says_when_and_with_which_model(home):
    history = HistoryStore(home.history_db)
    now = datetime.now().astimezone()
    last_year = now.replace(year=now.year - 1, month=3, day=4, hour=9, minute=15)
    this_year = now.replace(month=1, day=1, hour=0, minute=5)
    times = {}
    for model, when in [("tiny", last_year), ("tiny-mqa", this_year), ("tiny", now)]:
        said = history.create(model=model)
        history.add_message(said, "user", "Say OK.")
        times[said] = when
    pin_times(home, times)
    app = app_for(home)
    async with app.run_test(size=LARGE) as pilot:
        await settle(pilot, app)
        listing = app.query_one(ConversationList)
        labels = [str(listing.get_option_at_index(i).prompt) for i in range(3)]
        assert labels[0] == f"Say OK.\n{now:%H:%M} · tiny"  # today: the time
        if this_year.date() != now.date():  # this year: the day and the time
            assert labels[1] == "Say OK.\n1 Jan 00:05 · tiny-mqa"
        assert labels[2] == f"Say OK.\n4 Mar {now.year - 1} · tiny"  # before: the day


async def test_page_up_and_down_in_the_editor_scroll_the_chat(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    for index in range(12):
        history.add_message(conversation, "user", f"Question {index}")
        history.add_message(conversation, "assistant", f"Answer {index}\n\nwith a second paragraph")
    app = app_for(home, continue_latest=True)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        chat, prompt = app.query_one(ChatView), app.query_one(PromptInput)
        prompt.text = "a draft\nof two lines"
        prompt.move_cursor(prompt.document.end)
        await pilot.pause()
        assert prompt.has_focus and chat.max_scroll_y > 0 and chat.scroll_y == chat.max_scroll_y
        await pilot.press("pageup")
        await pilot.pause()
        assert chat.scroll_y < chat.max_scroll_y
        assert prompt.has_focus and prompt.text == "a draft\nof two lines"
        assert prompt.cursor_location == prompt.document.end  # the draft's cursor stays
        await pilot.press("pagedown")
        await pilot.pause()
        assert chat.scroll_y == chat.max_scroll_y


async def test_the_chat_pane_shows_focus_and_passes_typing_to_the_editor(home):
    app = app_for(home)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot, app)
        chat, prompt = app.query_one(ChatView), app.query_one(PromptInput)
        unfocused = chat.styles.border_top
        chat.focus()
        await pilot.pause()
        assert chat.styles.border_top != unfocused
        assert chat.styles.border_top[0] not in ("", "none", "hidden")
        await pilot.press("h", "i", "space", "?")
        assert prompt.has_focus and prompt.text == "hi ?"
