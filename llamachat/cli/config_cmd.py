"""`llamachat config`: where the config file is, what it sets, and changing it."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ..home import Home
from ..settings import SETTINGS, load, parse_value, save, unset_key
from .console import stderr, stdout

app = typer.Typer(help="Show or change the defaults in the config file.", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def show(ctx: typer.Context) -> None:
    """Show the config file's path and what it sets."""
    if ctx.invoked_subcommand is not None:
        return
    home = Home.current()
    settings = load(home.config_file)
    stdout.print(f"config file: {home.config_file}", markup=False)
    stdout.print(f"models:      {home.models}", markup=False)
    items = settings.items()
    if not items:
        stdout.print("nothing is set; every default applies", markup=False)
    for key, value in items:
        stdout.print(f"{key} = {value!r}", markup=False)


@app.command("set")
def set_value(
    key: Annotated[str, typer.Argument(help="One of: " + ", ".join(s.key for s in SETTINGS))],
    value: Annotated[str, typer.Argument(help="The new value.")],
) -> None:
    """Set a default (flags still override it)."""
    home = Home.current()
    settings = load(home.config_file)
    parsed = parse_value(key, value)
    save(home.config_file, dataclasses.replace(settings, **{key: parsed}))
    stderr.print(f"{key} = {parsed!r}", markup=False)


@app.command("unset")
def unset_value(key: Annotated[str, typer.Argument(help="The setting to remove.")]) -> None:
    """Remove a default."""
    key = unset_key(key)
    home = Home.current()
    settings = load(home.config_file)
    save(home.config_file, dataclasses.replace(settings, **{key: None}))
