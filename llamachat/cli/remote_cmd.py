"""`llamachat remote`: the OpenAI-compatible servers whose models `-m NAME/MODEL` chats with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import remotes
from ..home import Home
from .console import CliError, stderr, stdout

app = typer.Typer(help="Add, list or remove remote servers (-m NAME/MODEL).", no_args_is_help=True)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="What to call it: -m NAME/MODEL picks its models.")],
    url: Annotated[
        str, typer.Argument(help="Its API's base URL, e.g. http://box:8000/v1 (/v1 if no path).")
    ],
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env",
            help="The environment variable that holds its key (the key itself is never stored).",
        ),
    ] = None,
    api_key_file: Annotated[
        str | None,
        typer.Option(
            "--api-key-file",
            help="Or a file that holds its key, readable by you alone (chmod 600).",
        ),
    ] = None,
) -> None:
    """Add a remote server (or change one)."""
    path = Home.current().remotes_file
    known = _load(path)
    remote = _checked(name, url, api_key_env, api_key_file)
    if remote.api_key_file is not None:
        try:
            remotes.read_key_file(Path(remote.api_key_file))  # a bad file is said now, not later
        except remotes.RemoteError as error:
            raise CliError(str(error), 2) from None
    known[remote.name] = remote
    remotes.save(path, known)
    stderr.print(f"{remote.name}: {remote.url}", markup=False)


@app.command("list")
def list_remotes() -> None:
    """The remotes, a line each: name, URL, and the variable holding the key."""
    for remote in _load(Home.current().remotes_file).values():
        key = f"  key from ${remote.api_key_env}" if remote.api_key_env else ""
        key = f"  key from {remote.api_key_file}" if remote.api_key_file else key
        stdout.print(f"{remote.name}  {remote.url}{key}", markup=False)


@app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="The remote to forget.")]) -> None:
    """Forget a remote server."""
    path = Home.current().remotes_file
    known = _load(path)
    if name not in known:
        raise CliError(f"no remote named {name!r} (remotes: {', '.join(known) or 'none'})", 2)
    del known[name]
    remotes.save(path, known)
    stderr.print(f"removed {name}", markup=False)


def _load(path) -> dict[str, remotes.Remote]:
    try:
        return remotes.load(path)
    except remotes.RemoteError as error:
        raise CliError(str(error), error.exit_code) from None


def _checked(
    name: str, url: str, api_key_env: str | None, api_key_file: str | None
) -> remotes.Remote:
    try:
        return remotes.checked(name, url, api_key_env, api_key_file)
    except remotes.RemoteError as error:
        raise CliError(str(error), error.exit_code) from None
