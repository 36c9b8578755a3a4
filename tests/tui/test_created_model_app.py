"""A model made with `llamachat create` in the chat app: its Chatfile's SYSTEM and PARAMETERs
are what a conversation without its own gets."""

from __future__ import annotations

import pytest

from llamachat.backends import Sampling
from llamachat.create.build import create_model
from llamachat.create.chatfile import parse_chatfile
from llamachat.engine import ChatModel, SamplingParams
from llamachat.history.store import HistoryStore
from llamachat.home import Home
from llamachat.models.pull import pull
from llamachat.models.store import ModelStore
from tests.tui.conftest import app_for, send, settle

SYSTEM = "You are a pirate. Answer in one line."


@pytest.fixture
def created_home(tiny_model_factory, tmp_path) -> Home:
    data = tmp_path / "home"
    store = ModelStore(data / "models")
    pull(str(tiny_model_factory()[0]), store, tmp_path / "cache", name="tiny")
    chatfile = f"FROM tiny\nSYSTEM {SYSTEM}\nPARAMETER temperature 0\nPARAMETER max_tokens 5\n"
    create_model(store, "pirate", parse_chatfile(chatfile, tmp_path))
    return Home(data=data, config=data, cache=tmp_path / "cache")


async def test_the_app_replies_with_the_created_models_system_prompt_and_defaults(
    created_home, tiny_model_factory
):
    app = app_for(created_home, model="pirate", sampling=Sampling(), max_tokens=None)
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hello there")
        conversation = HistoryStore(app.home.history_db).get(app.conversation_id)
    user, reply = conversation.messages
    assert user.role == "user" and reply.generated_tokens == 5  # PARAMETER max_tokens 5
    model = ChatModel.load(tiny_model_factory()[0], device="cpu")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    greedy = SamplingParams(temperature=0, repeat_penalty=1.1)  # llamachat's default penalty
    assert reply.content == "".join(model.session().reply(messages, greedy, max_new_tokens=5))
