"""Branches in the chat app: the ‹2/3› markers, flipping between siblings, and the actions on a
message selected with the keyboard or the mouse, against a real tiny model and a real history."""

from __future__ import annotations

import base64

from llamachat.backends.base import ReplyRequest
from llamachat.history.store import HistoryStore
from llamachat.tui.screens.dialogs import ConfirmScreen
from llamachat.tui.widgets.chat_view import ChatView, ReplyTurn, UserTurn
from llamachat.tui.widgets.prompt_input import PromptInput
from tests.tui.conftest import app_for, send, settle
from tests.tui.screen import on_screen


def stored(app):
    return HistoryStore(app.home.history_db).get(app.conversation_id)


def turns(app):
    return app.query_one(ChatView).turns()


def markers(app) -> list[str | None]:
    return [turn.border_title for turn in turns(app)]


def watch_prompts(app) -> list[list[dict[str, str]]]:
    """What the model is asked from now on: the messages of each reply, as the backend got them."""
    seen: list[list[dict[str, str]]] = []
    reply = app.chat.reply

    def recording(messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return reply(messages, **kwargs)

    app.chat.reply = recording
    return seen


async def select(pilot, app, message_id: int) -> None:
    """Focus the chat (F6: the last message) and move the cursor up to `message_id`."""
    await pilot.press("f6")
    view = app.query_one(ChatView)
    ids = [t.message_id for t in view.turns()]
    for _ in range(len(ids) - 1 - ids.index(message_id)):
        await pilot.press("up")
    assert view.has_focus and view.selected.message_id == message_id


async def two_turns_and_a_regenerated_first_reply(pilot, app) -> tuple[int, int, int]:
    """Hello → reply A, regenerated as reply B (‹2/2›); then a second question and its reply.
    Returns the ids of A, B and the first question."""
    await send(pilot, app, "Hello")
    first_reply = turns(app)[-1].message_id
    await pilot.press("ctrl+r")
    await settle(pilot, app)
    second_reply = turns(app)[-1].message_id
    question = turns(app)[0].message_id
    await send(pilot, app, "And then?")
    return first_reply, second_reply, question


async def test_a_regenerated_reply_shows_which_sibling_it_is(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        assert markers(app) == [None, None]
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert markers(app) == [None, "‹2/2›"]  # while it streamed and after
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert markers(app) == [None, "‹3/3›"]
        assert turns(app)[-1].has_class("branched")
        assert "‹3/3›" in "\n".join(on_screen(app))


async def test_flipping_shows_the_other_branch_and_the_model_continues_it(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        first, second, question = await two_turns_and_a_regenerated_first_reply(pilot, app)
        second_path = [m.id for m in stored(app).messages]
        await select(pilot, app, second)
        assert markers(app)[1] == "‹2/2›"
        await pilot.press("left")
        await pilot.pause()
        # The first reply's branch, which ended there: the second question is not on it.
        conversation = stored(app)
        assert conversation.active_leaf == first
        assert [t.message_id for t in turns(app)] == [question, first]
        assert markers(app) == [None, "‹1/2›"]
        assert app.query_one(ChatView).selected.message_id == first  # the cursor stays
        await pilot.press("left")  # the first branch already: nothing changes
        assert stored(app).active_leaf == first
        seen = watch_prompts(app)
        await send(pilot, app, "Go on")
        (messages,) = seen
        first_text = next(m.content for m in conversation.tree if m.id == first)
        assert messages == [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": "Go on"},
        ]
        # Back to the second branch: resumed where it was left, with its second question.
        await select(pilot, app, first)
        await pilot.press("right")
        await pilot.pause()
        assert stored(app).active_leaf == second_path[-1]
        assert [t.message_id for t in turns(app)] == second_path


async def test_flipping_from_the_palette_acts_on_the_last_reply(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        first = turns(app)[-1].message_id
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        await app.run_action("branch(-1)")  # the prompt has focus: nothing selected
        await pilot.pause()
        assert stored(app).active_leaf == first and markers(app)[-1] == "‹1/2›"


async def test_editing_an_earlier_message_makes_a_sibling_and_the_reply_follows_it(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await send(pilot, app, "What is a fox?")
        hello = turns(app)[0].message_id
        await select(pilot, app, hello)
        await pilot.press("enter")
        prompt = app.query_one(PromptInput)
        assert prompt.has_focus and prompt.text == "Hello" and app.editing == hello
        assert app.query_one(ChatView).selected is None  # the cursor ends with the chat's focus
        seen = watch_prompts(app)
        prompt.text = "Good morning"
        await pilot.press("enter")
        await settle(pilot, app)
        assert seen == [[{"role": "user", "content": "Good morning"}]]
        conversation = stored(app)
        edited, reply = conversation.messages
        assert (edited.content, reply.role, reply.parent_id) == (
            "Good morning",
            "assistant",
            edited.id,
        )
        assert conversation.siblings(edited.id).ids == (hello, edited.id)
        assert [t.message_id for t in turns(app)] == [edited.id, reply.id]
        assert markers(app) == ["‹2/2›", None]
        # The original question keeps its branch, both turns of it.
        assert len(conversation.tree) == 6


async def test_enter_on_a_reply_does_not_edit_it(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await pilot.press("f6", "enter")
        assert app.editing is None and app.query_one(PromptInput).text == ""


async def test_regenerate_from_a_middle_reply_branches_there(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        await send(pilot, app, "What is a fox?")
        question, middle = (t.message_id for t in turns(app)[:2])
        await select(pilot, app, middle)
        seen = watch_prompts(app)
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert seen == [[{"role": "user", "content": "Hello"}]]
        conversation = stored(app)
        asked, again = conversation.messages
        assert asked.id == question and again.id != middle and again.parent_id == question
        assert conversation.siblings(again.id).ids == (middle, again.id)
        assert [t.message_id for t in turns(app)] == [question, again.id]
        assert markers(app) == [None, "‹2/2›"]
        assert len(conversation.tree) == 5  # the fox question and its reply are kept


async def test_delete_branch_asks_first_and_then_shows_the_sibling(home):
    app = app_for(home)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        first, second, question = await two_turns_and_a_regenerated_first_reply(pilot, app)
        await select(pilot, app, second)
        await pilot.press("delete")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert len(stored(app).tree) == 5 and len(turns(app)) == 4
        await pilot.press("delete")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        conversation = stored(app)
        assert [m.id for m in conversation.tree] == [question, first]
        assert conversation.active_leaf == first
        assert [t.message_id for t in turns(app)] == [question, first]
        assert markers(app) == [None, None]  # the only reply now


async def test_copy_the_selected_message_and_its_code_block(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Code please")
    history.add_message(conversation, "assistant", "Here:\n```python\nprint('hi')\n```\nDone.")
    history.add_message(conversation, "user", "And no code")
    history.add_message(conversation, "assistant", "Plain words.")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        written: list[str] = []
        app._driver.write = written.append  # what the terminal is sent
        ids = [t.message_id for t in turns(app)]
        await select(pilot, app, ids[1])
        await pilot.press("f3")
        text = "Here:\n```python\nprint('hi')\n```\nDone."
        assert app.clipboard == text
        assert f"\x1b]52;c;{base64.b64encode(text.encode()).decode()}\a" in written
        await pilot.press("f4")
        assert app.clipboard == "print('hi')\n"
        await pilot.press("up")  # a user's message copies too
        await pilot.press("f3")
        assert app.clipboard == "Code please"
        await pilot.press("escape")  # back to the editor: F3 copies the last reply again
        assert app.query_one(PromptInput).has_focus
        await pilot.press("f3")
        assert app.clipboard == "Plain words."


async def test_a_click_selects_the_message(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "First question")
    history.add_message(conversation, "assistant", "First answer")
    history.add_message(conversation, "user", "Second question")
    app = app_for(home, continue_latest=True)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        first = turns(app)[0]
        assert await pilot.click(first)
        await pilot.pause()
        view = app.query_one(ChatView)
        assert view.has_focus and view.selected is first and first.has_class("selected")
        await pilot.press("enter")
        assert app.query_one(PromptInput).text == "First question"


async def test_nothing_that_changes_the_path_runs_while_a_reply_is_written(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Hello")
    first = history.add_message(conversation, "assistant", "One answer")
    history.branch_from(first)
    history.add_message(conversation, "assistant", "Another answer")
    app = app_for(home, max_tokens=900, continue_latest=True)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot, app)
        before = stored(app)
        app.post_message(PromptInput.Submitted("Tell me everything"))
        await pilot.pause()
        assert app.generating
        view = app.query_one(ChatView)
        view.select(turns(app)[1])  # "Another answer", ‹2/2›: its sibling is `first`
        for action in ("branch(-1)", "branch(1)", "delete_branch", "regenerate"):
            await app.run_action(action)
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await settle(pilot, app)
        after = stored(app)
        assert [m.id for m in after.messages][:2] == [m.id for m in before.messages]
        assert after.messages[-1].status == "interrupted"
        assert {m.id for m in before.tree} <= {m.id for m in after.tree}  # nothing deleted
        assert isinstance(turns(app)[-1], ReplyTurn) and isinstance(turns(app)[-2], UserTurn)


async def test_continue_goes_on_with_a_stopped_reply_of_the_local_model(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Hello")
    stopped = history.start_reply(conversation, "tiny")
    history.finish_reply(stopped, "Half an answ", "interrupted")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+g")
        await settle(pilot, app)
        reply = stored(app).messages[-1]
        assert reply.id == stopped and reply.content.startswith("Half an answ")
        # What the engine writes after the reply left open (the tiny model's ChatML), greedy.
        left_open = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHalf an answ"
        more = "".join(app.chat.complete(left_open, request=ReplyRequest(max_tokens=12)))
        assert more and reply.content == "Half an answ" + more
        assert reply.status == "length" and reply.generated_tokens == 12


async def test_shift_tab_from_the_editor_selects_the_last_message_and_escape_goes_back(home):
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Hello")
    history.add_message(conversation, "assistant", "Hi there")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("shift+tab")
        view = app.query_one(ChatView)
        assert view.has_focus and view.selected is turns(app)[-1]
        await pilot.press("up", "up", "down", "home")
        assert view.selected is turns(app)[0]
        await pilot.press("end")
        assert view.selected is turns(app)[-1]
        await pilot.press("escape")
        assert app.query_one(PromptInput).has_focus and view.selected is None
        assert not [t for t in turns(app) if t.has_class("selected")]
