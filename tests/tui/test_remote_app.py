"""The chat app on remote models, driven by the Pilot: a real `llamachat serve` subprocess on
127.0.0.1 with a key, serving the tiny model as `tiny` (installed in the app's home too, so the
app has its tokenizer) and as `far` (which the app's home lacks: the server counts its tokens)."""

from __future__ import annotations

import asyncio

import pytest

from llamachat.history.store import HistoryStore
from llamachat.remotes import checked, save
from llamachat.tui.screens.dialogs import PickScreen
from llamachat.tui.widgets.chat_view import ChatView
from llamachat.tui.widgets.prompt_input import PromptInput
from tests.conftest import cli_env, run_cli
from tests.server.conftest import start_server
from tests.tui.conftest import app_for, send, settle

KEY = "tui-remote-key"


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    env = cli_env(tmp_path_factory.mktemp("tui-remote-server"))
    folder = str(tiny_model_factory()[0])  # the very model the app's home has as `tiny`
    for name in ("tiny", "far"):
        assert run_cli("pull", folder, "--as", name, env=env).returncode == 0
    served = start_server(env, "-m", "tiny", "-m", "far", "--max-batch", "2", api_key=KEY)
    yield served
    served.stop()


@pytest.fixture
def remote_home(home, server, monkeypatch):
    """The app's home with the server added as remote `box`, its key in BOX_KEY."""
    save(home.remotes_file, {"box": checked("box", server.url, "BOX_KEY")})
    monkeypatch.setenv("BOX_KEY", KEY)
    return home


def stored(app):
    return HistoryStore(app.home.history_db).get(app.conversation_id)


def served_answer(server, content: str, max_tokens: int) -> str:
    reply = server.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return reply.choices[0].message.content


async def test_a_remote_model_answers_in_the_app_as_its_server_does(remote_home, server):
    app = app_for(remote_home, model="box/tiny")
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        assert app.model_name == "box/tiny"
        assert app.status.device.startswith(f"remote {server.url}/v1")
        await send(pilot, app, "Hello there")
        reply = stored(app).messages[-1]
        assert reply.content == served_answer(server, "Hello there", 12)
        assert reply.status == "length" and reply.model == "box/tiny"
        assert reply.prompt_tokens > 0  # the server's own count, from its usage
        assert app.status.tokens_per_s is not None
        # The model's tokenizer is here: the meter counts what the server counted.
        (question,) = [m for m in stored(app).chat_messages() if m["role"] == "user"]
        assert app.chat.context_use([question]).used == reply.prompt_tokens


async def test_the_picker_lists_the_remotes_models_and_switches_to_one(remote_home):
    app = app_for(remote_home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+l")
        for _ in range(100):  # the remote is asked on a worker thread
            if isinstance(app.screen, PickScreen):
                break
            await pilot.pause(0.05)
        assert isinstance(app.screen, PickScreen)
        choices = app.screen.query_one("#choices")
        names = [choices.get_option_at_index(i).id for i in range(choices.option_count)]
        assert {"tiny", "tiny-mqa", "box/tiny", "box/far"} <= set(names)
        choices.highlighted = choices.get_option_index("box/far")
        await pilot.press("enter")
        await settle(pilot, app)
        assert app.model_name == "box/far" and app.status.device.startswith("remote")
        await send(pilot, app, "Hi")
        assert stored(app).messages[-1].model == "box/far"
        assert stored(app).messages[-1].status == "length"


async def test_escape_closes_a_remote_stream_and_keeps_what_came(remote_home, server):
    app = app_for(remote_home, model="box/tiny", max_tokens=900)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        app.post_message(PromptInput.Submitted("Tell me everything"))
        for _ in range(400):  # until the first piece is on the screen
            await asyncio.sleep(0.005)
            turns = app.query_one(ChatView).turns()
            if len(turns) == 2 and turns[-1].text:
                break
        await pilot.press("escape")
        await settle(pilot, app)
        reply = stored(app).messages[-1]
        assert reply.status == "interrupted"
        assert reply.content and reply.content == app.query_one(ChatView).turns()[-1].text
    deadline = asyncio.get_running_loop().time() + 30
    while server.metric("llamachat_requests_running") != 0:  # the server cancelled it too
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    "model", ["box/tiny", "box/far"], ids=["tokenizer-here", "counted-by-server"]
)
async def test_turns_a_remote_model_no_longer_sees_are_marked(remote_home, model):
    history = HistoryStore(remote_home.history_db)
    conversation = history.create(model=model)
    for index in range(8):
        history.add_message(conversation, "user", f"Question {index} about the quick brown fox")
        history.add_message(conversation, "assistant", f"Answer {index} about the lazy dog")
    app = app_for(remote_home, model=model, ctx=128, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.status.context_size == 128
        await send(pilot, app, "And now?")
        turns = app.query_one(ChatView).turns()
        unseen = [t for t in turns if t.has_class("unseen")]
        assert unseen and unseen[0] is turns[0] and not turns[-2].has_class("unseen")
        assert app.status.dropped == len(unseen)
        reply = stored(app).messages[-1]
        assert reply.status == "length"  # answered: what was sent fitted the server's window
        assert reply.prompt_tokens + reply.generated_tokens <= 128


async def test_continue_goes_on_with_a_cut_reply_in_the_same_message(remote_home, server):
    app = app_for(remote_home, model="box/tiny")
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello")
        cut = stored(app).messages[-1]
        assert (cut.status, cut.finish_reason) == ("length", "length")  # max_tokens 12
        await pilot.press("ctrl+g")
        await settle(pilot, app)
        conversation = stored(app)
        reply = conversation.messages[-1]
        assert reply.id == cut.id and len(conversation.tree) == 2  # the same message, grown
        # What the server writes after the reply left open (the tiny model's ChatML), greedy.
        left_open = f"<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n{cut.content}"
        more = server.client().completions.create(
            model="tiny", prompt=left_open, temperature=0, max_tokens=12
        )
        assert more.choices[0].text and reply.content == cut.content + more.choices[0].text
        assert reply.status == "length" and reply.generated_tokens == 12
        shown = app.query_one(ChatView).turns()
        assert len(shown) == 2 and shown[-1].text == reply.content


async def test_continue_refuses_a_reply_that_ended_by_itself(remote_home):
    history = HistoryStore(remote_home.history_db)
    conversation = history.create(model="box/tiny")
    history.add_message(conversation, "user", "Hello")
    history.add_message(conversation, "assistant", "Hello!")  # complete
    app = app_for(remote_home, model="box/tiny", continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+g")
        await settle(pilot, app)
        assert any("stopped or cut" in str(n.message) for n in app._notifications)
        assert stored(app).messages[-1].content == "Hello!"
