"""The chat app refuses a model whose files are not the size its manifest recorded, saying which
file and what to run, and stays usable."""

from __future__ import annotations

from tests.tui.conftest import app_for, copy_model, settle


async def test_a_truncated_model_is_refused_with_the_file_named(home):
    damaged = copy_model(home, "tiny", "damaged")
    weights = damaged / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    app = app_for(home, model="damaged")
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.chat is None and app.status.note == "failed to load"
        (message,) = [str(n.message) for n in app._notifications if "damaged" in str(n.message)]
        assert "model.safetensors is" in message and "llamachat verify damaged" in message
        app._switch_model("tiny")  # what the model picker does
        await settle(pilot, app)
        assert app.chat is not None
