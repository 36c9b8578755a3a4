"""The chat app's replies take the same defaults as the command line: the model's
generation_config.json, else a repetition penalty of 1.1 and a 2,048-token limit."""

from __future__ import annotations

import json

from llamachat.engine import ChatModel, SamplingParams
from llamachat.history.store import HistoryStore
from llamachat.tui.widgets.prompt_input import PromptInput
from tests.conftest import rerecord
from tests.tui.conftest import app_for, copy_model, settle

QUESTION = "Hello there"


def advise(folder, **advice) -> None:
    """Write generation_config.json advice into an installed copy, keeping its manifest true."""
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **advice}))
    rerecord(folder)


def engine_reply(folder, sampling: SamplingParams, max_new_tokens: int) -> str:
    model = ChatModel.load(folder, device="cpu", quantization="auto")
    reply = model.session().reply([{"role": "user", "content": QUESTION}], sampling, max_new_tokens)
    return "".join(reply)


async def ask(app) -> str:
    async with app.run_test(size=(110, 36)) as pilot:
        await settle(pilot, app)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.text = QUESTION
        await pilot.press("enter")
        await settle(pilot, app)
        conversation = HistoryStore(app.home.history_db).get(app.conversation_id)
        return conversation.messages[-1].content


async def test_the_models_advice_decides_what_no_option_does(home):
    folder = copy_model(home, "tiny", "advised")
    advise(folder, repetition_penalty=1.3, max_new_tokens=5)
    expected = engine_reply(folder, SamplingParams(temperature=0, repeat_penalty=1.3), 5)
    plain = engine_reply(folder, SamplingParams(temperature=0, repeat_penalty=1.0), 12)
    assert not plain.startswith(expected)  # the penalty shows in the first five tokens
    app = app_for(home, model="advised", max_tokens=None)
    assert await ask(app) == expected


async def test_without_advice_greedy_replies_have_the_default_penalty(home):
    folder = home.data / "models" / "tiny"
    expected = engine_reply(folder, SamplingParams(temperature=0, repeat_penalty=1.1), 12)
    assert expected != engine_reply(folder, SamplingParams(temperature=0, repeat_penalty=1.0), 12)
    assert await ask(app_for(home)) == expected
