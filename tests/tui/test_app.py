"""The chat app, driven with Textual's Pilot against real tiny models and a real history."""

from __future__ import annotations

import json

import pytest
from textual.actions import parse as parse_action
from textual.command import CommandPalette

from llamachat.engine.quantize import fbgemm_available
from llamachat.history.store import HistoryStore
from llamachat.models.store import ModelStore
from llamachat.settings import load
from llamachat.tui.actions import ACTIONS, help_key
from llamachat.tui.screens.dialogs import ConfirmScreen, PickScreen, TextPromptScreen
from llamachat.tui.screens.help import HelpScreen
from llamachat.tui.screens.search import SearchScreen
from llamachat.tui.screens.system_prompt import SystemPromptScreen
from llamachat.tui.widgets.chat_view import ChatView, ReplyTurn, SystemNote, UserTurn
from llamachat.tui.widgets.conversation_list import ConversationList
from llamachat.tui.widgets.prompt_input import PromptInput
from llamachat.tui.widgets.status_bar import StatusBar
from tests.conftest import rerecord
from tests.tui.conftest import app_for, copy_model, palette_search, send, settle


def stored(app, conversation_id=None):
    return HistoryStore(app.home.history_db).get(conversation_id or app.conversation_id)


def turns(app):
    return app.query_one(ChatView).turns()


async def test_send_streams_the_reply_into_the_view_and_the_history(home):
    app = app_for(home)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there")
        user, reply = turns(app)
        assert isinstance(user, UserTurn) and user.text == "Hello there"
        assert isinstance(reply, ReplyTurn) and reply.text
        conversation = stored(app)
        assert [(m.role, m.status, m.finish_reason) for m in conversation.messages] == [
            ("user", "complete", None),
            ("assistant", "length", "length"),  # cut by max_tokens
        ]
        assert conversation.messages[1].content == reply.text
        assert conversation.summary.title == "Hello there"
        assert app.query_one(ConversationList).option_count == 1
        assert app.status.tokens_per_s is not None and app.status.context_used > 0
        assert app.query_one(PromptInput).text == ""


async def test_escape_stops_the_reply_and_keeps_what_was_written(home):
    app = app_for(home, max_tokens=900)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        # Sent as the editor sends it, then Esc at once: pilot.press waits up to a second for
        # the app to idle after each key, in which a tiny model can write all 900 tokens.
        app.post_message(PromptInput.Submitted("Tell me everything"))
        await pilot.press("escape")
        await settle(pilot, app)
        reply = stored(app).messages[-1]
        assert reply.status == "interrupted"
        assert reply.generated_tokens < 900
        assert turns(app)[-1].has_class("interrupted")
        assert reply.content == turns(app)[-1].text


async def test_ctrl_c_copies_a_selection_in_the_editor_and_quits_otherwise(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.text = "keep this"
        prompt.select_all()
        await pilot.press("ctrl+c")
        assert app.clipboard == "keep this" and app.is_running
        prompt.move_cursor(prompt.document.end)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running


async def test_regenerate_replaces_the_last_reply_reusing_the_cache_and_keeps_the_first(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        first = turns(app)[-1].message_id
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        conversation = stored(app)
        question, reply = conversation.messages
        assert (question.role, reply.role) == ("user", "assistant")
        assert [t.message_id for t in turns(app)] == [question.id, reply.id]
        assert reply.id != first and turns(app)[-1].text == reply.content
        # The first reply is kept beside the new one, which the model's path now ends with.
        assert conversation.siblings(reply.id).ids == (first, reply.id)
        assert [m.id for m in conversation.children(question.id)] == [first, reply.id]
        assert conversation.active_leaf == reply.id
        kept = next(m for m in conversation.tree if m.id == first)
        assert kept.content == reply.content  # greedy: the same reply again
        assert app.status.reused_tokens > 0


async def test_edit_last_message_and_resend(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await send(pilot, app, "What is a fox?")
        await pilot.press("up")  # the editor is empty: take the last message back
        prompt = app.query_one(PromptInput)
        assert prompt.text == "What is a fox?" and app.editing is not None
        assert prompt.cursor_location == prompt.document.end
        assert "editing your message" in str(prompt.border_title)
        edited = [t for t in turns(app) if t.has_class("editing")]
        assert [t.text for t in edited] == ["What is a fox?"]
        await pilot.press("backspace", *"x?")  # typing goes at the end
        assert prompt.text == "What is a fox?"[:-1] + "x?"
        prompt.text = "What is a dog?"
        await pilot.press("enter")
        await settle(pilot, app)
        assert not prompt.border_title and not [t for t in turns(app) if t.has_class("editing")]
        conversation = stored(app)
        contents = [(m.role, m.content) for m in conversation.messages]
        assert [c for r, c in contents if r == "user"] == ["Hello", "What is a dog?"]
        assert [r for r, _ in contents] == ["user", "assistant", "user", "assistant"]
        assert [t.text for t in turns(app) if isinstance(t, UserTurn)] == [
            "Hello",
            "What is a dog?",
        ]
        # The message edited is kept, with its reply, as the sibling of the one sent instead.
        dog = conversation.messages[2]
        (fox,) = [m for m in conversation.tree if m.content == "What is a fox?"]
        assert conversation.siblings(dog.id).ids == (fox.id, dog.id)
        assert len(conversation.children(fox.id)) == 1 and len(conversation.tree) == 6


async def test_escape_cancels_editing_and_says_so_no_more(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await pilot.press("up")
        prompt = app.query_one(PromptInput)
        assert prompt.text == "Hello" and prompt.border_title
        await pilot.press("escape")
        assert prompt.text == "" and app.editing is None and not prompt.border_title
        assert not [t for t in turns(app) if t.has_class("editing")]
        assert [m.content for m in stored(app).messages if m.role == "user"] == ["Hello"]


async def test_new_chat_then_switch_back_and_continue(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "First conversation")
        first = app.conversation_id
        await pilot.press("ctrl+n")
        assert app.conversation_id is None and turns(app) == []
        await send(pilot, app, "Second conversation")
        assert app.conversation_id != first
        listing = app.query_one(ConversationList)
        listing.focus()
        listing.highlighted = listing.get_option_index(str(first))
        await pilot.press("enter")
        await settle(pilot, app)
        assert app.conversation_id == first
        assert [t.text for t in turns(app) if isinstance(t, UserTurn)] == ["First conversation"]
        await send(pilot, app, "Go on")
        assert app.status.reused_tokens < app.status.context_used // 2  # history prefilled once
        await send(pilot, app, "And more")
        assert app.status.reused_tokens > app.status.context_used // 2  # then reused
        assert len(stored(app, first).messages) == 6


async def test_restart_shows_every_conversation_and_continues_the_latest(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Remember me")
    again = app_for(home, continue_latest=True)
    async with again.run_test() as pilot:
        await settle(pilot, again)
        assert again.query_one(ConversationList).option_count == 1
        assert [t.text for t in turns(again) if isinstance(t, UserTurn)] == ["Remember me"]
        await send(pilot, again, "Still there?")
        assert len(stored(again).messages) == 4


async def test_system_prompt_edit_applies_from_the_next_turn(home):
    app = app_for(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hi")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SystemPromptScreen)
        app.screen.query_one("#prompt").text = "Answer like a pirate."
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(turns(app)[-1], SystemNote)
        await send(pilot, app, "Hello again")
        conversation = stored(app)
        assert conversation.system_prompt == "Answer like a pirate."
        assert conversation.chat_messages()[0] == {
            "role": "system",
            "content": "Answer like a pirate.",
        }


async def test_apply_a_preset_to_a_new_chat(home):
    app = app_for(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+s")
        presets = app.screen.query_one("#presets")
        presets.focus()
        presets.highlighted = presets.get_option_index("coder")
        await pilot.press("enter")
        assert "expert programmer" in app.screen.query_one("#prompt").text
        await pilot.press("ctrl+s")
        await send(pilot, app, "Sort a list")
        assert "expert programmer" in stored(app).system_prompt


async def test_search_opens_the_conversation_found(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Tell me about zebras")
        target = app.conversation_id
        await pilot.press("ctrl+n")
        await send(pilot, app, "Something else")
        await pilot.press("ctrl+f")
        assert isinstance(app.screen, SearchScreen)
        await pilot.press(*"zebra")
        await pilot.press("enter")
        await pilot.pause()
        assert app.conversation_id == target


async def test_rename_and_delete_with_confirmation(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "To be renamed")
        await pilot.press("f2")
        assert isinstance(app.screen, TextPromptScreen)
        app.screen.query_one("#value").value = "My title"
        await pilot.press("enter")
        await pilot.pause()
        assert stored(app).summary.title == "My title"
        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert HistoryStore(home.history_db).conversations() != []
        await pilot.press("f8", "y")
        await pilot.pause()
        assert HistoryStore(home.history_db).conversations() == []
        assert app.conversation_id is None


async def test_the_open_conversation_is_not_deleted_while_its_reply_is_written(home):
    app = app_for(home, max_tokens=900)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there")
        app.post_message(PromptInput.Submitted("Tell me everything"))
        await pilot.pause()
        assert app.generating
        await pilot.press("f8", "y")
        await pilot.pause()
        assert app.conversation_id is not None
        await pilot.press("escape")
        await settle(pilot, app)
        assert HistoryStore(home.history_db).get(app.conversation_id).messages[-1].content


async def test_export_markdown_and_json(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Export me")
        await pilot.press("f5")
        app.action_export("json")
        markdown = (tmp_path / f"llamachat-{app.conversation_id}.md").read_text()
        assert markdown.startswith("# Export me") and "## You\n\nExport me" in markdown
        data = json.loads((tmp_path / f"llamachat-{app.conversation_id}.json").read_text())
        assert data["messages"][0]["content"] == "Export me"


async def test_switching_theme_is_remembered(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.theme == "llamachat-dark"
        assert {"llamachat-light", "high-contrast", "campfire"} <= set(app.available_themes)
        app.theme = "campfire"
        await pilot.pause()
    assert load(home.config_file).theme == "campfire"
    again = app_for(home)
    async with again.run_test() as pilot:
        assert again.theme == "campfire"
    forced = app_for(home, theme="high-contrast")
    async with forced.run_test() as pilot:
        assert forced.theme == "high-contrast"


async def test_a_users_own_theme_file_is_registered(home):
    home.themes.mkdir(parents=True)
    (home.themes / "mine.toml").write_text('name = "mine"\nprimary = "#123456"\ndark = true\n')
    (home.themes / "broken.toml").write_text("name = [\n")
    app = app_for(home, theme="mine")
    async with app.run_test() as pilot:
        await pilot.pause()
        assert app.theme == "mine"


async def test_copy_reply_and_code_block(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Code please")
    history.add_message(conversation, "assistant", "Here:\n```python\nprint('hi')\n```\nDone.")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        assert app.clipboard == "Here:\n```python\nprint('hi')\n```\nDone."
        await pilot.press("f4")
        assert app.clipboard == "print('hi')\n"


async def test_model_picker_switches_the_conversations_model(home):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hi")
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, PickScreen)
        choices = app.screen.query_one("#choices")
        choices.highlighted = choices.get_option_index("tiny-mqa")
        await pilot.press("enter")
        await settle(pilot, app)
        assert app.model_name == "tiny-mqa" and app.chat.model.config.n_kv_heads == 1
        await send(pilot, app, "Again")
        assert stored(app).summary.model == "tiny-mqa"
        assert stored(app).messages[-1].model == "tiny-mqa"


async def test_help_lists_every_key(home):
    app = app_for(home)
    async with app.run_test(size=(120, 50)) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        keys = {key for key, _ in app.screen.keys}
        assert {"ctrl+n", "ctrl+r", "ctrl+s", "ctrl+f", "f3", "f4", "escape", "ctrl+q"} <= keys
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


def record_actions(app) -> list[tuple[str, tuple]]:
    """Stand a recorder in for each of the table's actions on `app`: what would have run, with
    its arguments, is noted instead (no dialog opens, Quit does not quit)."""
    ran: list[tuple[str, tuple]] = []
    for entry in ACTIONS:
        _, name, _ = parse_action(entry.action)
        setattr(app, f"action_{name}", lambda *args, name=name: ran.append((name, args)))
    return ran


async def test_every_action_is_reachable_by_its_key_in_the_palette_and_on_the_help_screen(home):
    app = app_for(home)
    async with app.run_test(size=(120, 50)) as pilot:
        await settle(pilot, app)
        await pilot.press("f1")
        help_rows = list(app.screen.keys)
        await pilot.press("escape")
        ran = record_actions(app)
        for entry in ACTIONS:
            _, name, arguments = parse_action(entry.action)
            if entry.key is not None:
                assert (help_key(entry), entry.key_label) in help_rows, entry
                # A key for the selected message is the chat view's: the editor has its own.
                owner = ChatView if entry.in_chat else type(app)
                bound = [b for b in owner.BINDINGS if b.key == entry.key]
                assert len(bound) == 1, f"{entry.key} is bound {len(bound)} times"
                (binding,) = bound
                assert (binding.description, binding.show, binding.priority) == (
                    entry.key_label,
                    entry.show,
                    entry.priority,
                ), entry
                app.query_one(ChatView if entry.in_chat else PromptInput).focus()
                await pilot.press(entry.key)
                await pilot.pause()
                assert ran == [(name, arguments)], f"{entry.key} for {entry}"
                ran.clear()
            # Theme and Quit come from Textual's own provider: found, they show it is still there.
            found = await palette_search(pilot, app, entry.title)
            hits = [i for i, option in enumerate(found.options) if option.hit.text == entry.title]
            assert len(hits) == 1, f"{entry.title!r} is in the palette {len(hits)} times"
            found.highlighted = hits[0]
            await pilot.press("enter")
            await pilot.pause()
            assert not isinstance(app.screen, CommandPalette)
            assert ran == [(name, arguments)], f"the palette's {entry.title!r}"
            ran.clear()


async def test_a_model_that_fails_to_load_leaves_the_app_usable(home):
    broken = copy_model(home, "tiny", "broken")
    (broken / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    rerecord(broken)  # edited on purpose: not "damaged"
    app = app_for(home, model="broken")
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.chat is None and app.status.note == "failed to load"
        assert any("GPT2LMHeadModel" in str(n.message) for n in app._notifications)
        app.query_one(PromptInput).text = "Hello?"
        await pilot.press("enter")
        assert HistoryStore(home.history_db).conversations() == []
        await pilot.press("ctrl+l")
        choices = app.screen.query_one("#choices")
        choices.highlighted = choices.get_option_index("tiny")
        await pilot.press("enter")
        await settle(pilot, app)
        await send(pilot, app, "Hello?")
        assert stored(app).messages[-1].status == "length"  # answered, up to max_tokens


async def test_a_message_too_long_for_the_context_stays_in_the_editor_to_shorten(home):
    app = app_for(home, ctx=64)
    long_message = "the quick brown fox " * 40
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, long_message)
        assert any("context of 64" in str(n.message) for n in app._notifications)
        assert [t for t in turns(app) if isinstance(t, UserTurn)] == []
        # The question is not kept in the history, nor the conversation it would have begun.
        assert HistoryStore(home.history_db).conversations() == []
        prompt = app.query_one(PromptInput)
        assert prompt.text == long_message
        assert prompt.cursor_location == prompt.document.end
        await send(pilot, app, "Short")
        assert stored(app).messages[-1].status == "length"  # answered, up to max_tokens
        assert stored(app).summary.title == "Short"


async def test_an_edited_first_message_too_long_for_the_context_leaves_the_original(home):
    app = app_for(home, ctx=64)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hi")
        original = stored(app)
        await pilot.press("up")
        await send(pilot, app, "the quick brown fox " * 40)
        assert any("context of 64" in str(n.message) for n in app._notifications)
        kept = stored(app, original.id)  # the conversation, its first message and reply
        assert kept.tree == original.tree and kept.messages == ()


async def test_turns_the_model_no_longer_sees_are_marked(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    for index in range(8):
        history.add_message(conversation, "user", f"Question {index} about the quick brown fox")
        history.add_message(conversation, "assistant", f"Answer {index} about the lazy dog")
    app = app_for(home, ctx=128, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "And now?")
        unseen = [t for t in turns(app) if t.has_class("unseen")]
        assert unseen and unseen[0] is turns(app)[0]
        assert app.status.dropped == len(unseen)
        assert app.query_one("#status").has_class("warning")


@pytest.mark.parametrize("key", ["shift+enter", "ctrl+j"])
async def test_newline_keys_do_not_send(home, key):
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        await pilot.press("a", key, "b")
        assert prompt.text == "a\nb"
        assert HistoryStore(home.history_db).conversations() == []


async def test_the_status_bar_shows_the_weight_format_after_the_dtype(home):
    app = app_for(home, quantize="int4")
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot, app)
        assert app.chat.info.weight_format == "int4"
        assert str(app.query_one(StatusBar).render()).startswith("tiny · cpu float32 int4 · ctx")
    stored_as_is = app_for(home, quantize="none")
    async with stored_as_is.run_test(size=(120, 30)) as pilot:
        await settle(pilot, stored_as_is)
        assert stored_as_is.chat.info.weight_format is None
        assert stored_as_is.status.device == "cpu float32"


async def test_each_model_loads_in_the_format_its_pull_recorded_unless_told_otherwise(home):
    copy_model(home, "tiny", "tiny-int8")
    ModelStore(home.models).set_quantization("tiny-int8", "int8")
    app = app_for(home, model="tiny-int8")
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.status.device == "cpu float32 int8"
        app._switch_model("tiny")  # what the model picker does
        await settle(pilot, app)
        auto = "cpu float32 f16" if fbgemm_available() else "cpu float32"
        assert app.model_name == "tiny" and app.status.device == auto
    forced = app_for(home, model="tiny-int8", quantize="int4")
    async with forced.run_test() as pilot:
        await settle(pilot, forced)
        assert forced.status.device == "cpu float32 int4"


async def test_a_format_the_device_cannot_run_is_shown_and_the_app_stays_usable(home):
    app = app_for(home, dtype="bfloat16", quantize="f16")
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.chat is None and app.status.note == "failed to load"
        assert any("f16 weights compute in float32" in str(n.message) for n in app._notifications)
