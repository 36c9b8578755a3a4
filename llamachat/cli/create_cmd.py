"""create: a model of one's own from an installed base, LoRA adapters and reply defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..home import Home
from ..models.store import ModelStore
from .console import CliError, stderr
from .progress import RichProgress


def create(
    name: Annotated[str, typer.Argument(help="The new model's name.")],
    chatfile: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="A Chatfile: FROM, ADAPTER, SYSTEM, FORMAT and PARAMETER lines (README).",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--from", help="The installed model it is made from.")
    ] = None,
    adapters: Annotated[
        list[Path] | None,
        typer.Option(
            "--adapter",
            help="A PEFT LoRA folder (adapter_config.json, adapter_model.safetensors), merged"
            " into the weights; repeat for several, applied in order after the Chatfile's.",
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option("--system", help="The system prompt of conversations that have none."),
    ] = None,
    chat_format: Annotated[
        str | None,
        typer.Option("--chat-format", help="llama-2, llama-3, chatml, alpaca, vicuna, or model."),
    ] = None,
    no_merge: Annotated[
        bool,
        typer.Option(
            "--no-merge",
            help="Keep the adapters beside the base's weights and apply them on loading: a"
            " persona costs the disk of its adapters, and needs its base installed.",
        ),
    ] = False,
    parameters: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="A reply default, NAME=VALUE: temperature, top_p, top_k, min_p,"
            " repeat_penalty, max_tokens; repeat for several.",
        ),
    ] = None,
) -> None:
    """Make a model from an installed one: LoRA adapters merged in, its own system prompt,
    chat format and reply defaults. Flags override the Chatfile."""
    # torch and the merge only here: the other commands start without them.
    from ..create.build import create_model
    from ..create.chatfile import Recipe, parse_parameter, read_chatfile

    recipe = read_chatfile(chatfile) if chatfile is not None else Recipe()
    chosen = {}
    for given in parameters or []:
        key, separator, value = given.partition("=")
        if not separator:
            raise CliError(f"--param {given!r}: write NAME=VALUE, e.g. temperature=0.3", 2)
        key, number = parse_parameter(key.strip(), value.strip(), "--param")
        chosen[key] = number
    recipe = recipe.overridden(
        base, tuple(path.expanduser() for path in adapters or []), system, chat_format, chosen
    )
    store = ModelStore(Home.current().models)
    with RichProgress() as progress:
        task = None
        done = 0

        def advance(count: int) -> None:
            nonlocal task, done
            if task is None:
                task = progress.task(f"merging into {name}", None)
            done += count
            task.update(done)

        model = create_model(store, name, recipe, advance, merge=not no_merge)
        if task is not None:
            task.finish()
    count = len(recipe.adapters)
    stderr.print(
        f"created {model.name} from {recipe.base}"
        + (f" with {count} adapter{'s' if count != 1 else ''}" if count else "")
        + (" (applied on loading)" if count and no_merge else " merged" if count else ""),
        markup=False,
    )
