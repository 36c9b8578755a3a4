"""A llamachat home with tiny real models installed, and a way to drive the app with the Pilot."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from textual.command import CommandInput, CommandList, CommandPalette

from llamachat.backends import Sampling
from llamachat.chat_options import ChatOptions
from llamachat.home import Home
from llamachat.models.pull import pull
from llamachat.models.store import ModelStore
from llamachat.tui import LlamaChatApp, make_app
from llamachat.tui.widgets.prompt_input import PromptInput


@pytest.fixture(scope="session")
def tiny_store(tiny_model_factory, tmp_path_factory) -> Path:
    """A models folder with two tiny models, `tiny` and `tiny-mqa`, pulled from local folders."""
    root = tmp_path_factory.mktemp("tui-models")
    store = ModelStore(root / "models")
    pull(str(tiny_model_factory()[0]), store, root / "cache", name="tiny")
    pull(str(tiny_model_factory(num_key_value_heads=1)[0]), store, root / "cache", name="tiny-mqa")
    return root / "models"


@pytest.fixture
def home(tmp_path, tiny_store) -> Home:
    data = tmp_path / "home"
    data.mkdir()
    (data / "models").symlink_to(tiny_store)
    return Home(data=data, config=data, cache=tmp_path / "cache")


def options(**changes) -> ChatOptions:
    base = {
        "model": "tiny",
        "device": "cpu",
        "sampling": Sampling(temperature=0.0),
        "max_tokens": 12,
    }
    return ChatOptions(**{**base, **changes})


def app_for(home: Home, **changes) -> LlamaChatApp:
    return make_app(home, options(**changes))


async def settle(pilot, app: LlamaChatApp, timeout: float = 60) -> None:
    """Wait until the model is loaded (or failed) and no reply is being written."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await pilot.pause(0.05)
        loading = app.chat is None and "loading" in app.status.note
        if not app.generating and not loading and not _running(app):
            await pilot.pause(0.05)
            return
    raise AssertionError("the app did not settle")


async def send(pilot, app: LlamaChatApp, text: str) -> None:
    """Type `text` into the editor, send it, and wait for the reply to end."""
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")
    await settle(pilot, app)


def _running(app: LlamaChatApp) -> bool:
    return any(worker.is_running for worker in app.workers)


async def palette_search(pilot, app: LlamaChatApp, query: str) -> CommandList:
    """Open the command palette (Ctrl+P), type `query` and wait for the search to end: the
    palette's list of what every provider found (the app's actions and Textual's own)."""
    await pilot.press("ctrl+p")
    await pilot.pause()
    palette = app.screen
    assert isinstance(palette, CommandPalette)
    palette.query_one(CommandInput).value = query  # as typed, in one go
    await pilot.pause()
    await app.workers.wait_for_complete([w for w in app.workers if w.node is palette])
    await pilot.pause()
    return palette.query_one(CommandList)


async def palette_titles(pilot, app: LlamaChatApp, query: str) -> list[str]:
    """The titles the command palette offers for `query`; the palette is closed again."""
    found = await palette_search(pilot, app, query)
    titles = [str(option.hit.text) for option in found.options]
    await pilot.press("escape")
    await pilot.pause()
    return titles


def write_config(home: Home, **values) -> None:
    lines = [f"{key} = {json.dumps(value)}\n" for key, value in values.items()]
    home.config_file.write_text("".join(lines))


def copy_model(home: Home, source: str, target: str) -> Path:
    """A writable copy of an installed model (the shared one is a symlink)."""
    models = home.data / "models"
    real = models.resolve()
    (models).unlink()
    shutil.copytree(real, models, symlinks=False)
    shutil.copytree(models / source, models / target)
    manifest = json.loads((models / target / "manifest.json").read_text())
    manifest["name"] = target
    (models / target / "manifest.json").write_text(json.dumps(manifest))
    return models / target
