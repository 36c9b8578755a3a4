"""`llamachat cache`: the conversations' saved KV caches (instant resume): list them, clear them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import typer
from rich.table import Table

from ..home import Home
from ..kv_files import ContextFiles, format_size
from ..settings import load
from .console import stderr, stdout
from .history_cmd import JsonOption

app = typer.Typer(
    help="The conversations' saved KV caches, which let a conversation resume without being"
    " read again.",
    no_args_is_help=False,
)


def _files() -> ContextFiles:
    home = Home.current()
    return ContextFiles(home.kv, load(home.config_file).kv_disk_budget_bytes)


@app.callback(invoke_without_command=True)
def default(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the saved caches (as `cache list`)."""
    if ctx.invoked_subcommand is None:
        list_caches(as_json)


@app.command("list")
def list_caches(as_json: JsonOption = False) -> None:
    """The saved caches, the most recently used first, and the budget they share."""
    files = _files()
    saved = files.files()
    if as_json:
        listed = [
            {**asdict(f), "path": str(f.path), "conversation": _conversation(f.key)} for f in saved
        ]
        stdout.print_json(json.dumps(listed))
        return
    if saved:
        table = Table(box=None, pad_edge=False)
        for column in ("CONVERSATION", "SIZE", "LAST USED", "FILE"):
            table.add_column(column, no_wrap=True)
        for f in saved:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(f.used_at))
            table.add_row(f.key, format_size(f.size), when, f.path.name)
        stdout.print(table)
    total = sum(f.size for f in saved)
    budget = format_size(files.budget) if files.enabled else "0: saving is off"
    stderr.print(
        f"{len(saved)} saved, {format_size(total)} of {budget} (kv_disk_budget) in {files.folder}",
        markup=False,
    )


@app.command("clear")
def clear() -> None:
    """Remove every saved cache (conversations are kept; their next turn reads them again)."""
    removed = _files().clear()
    freed = sum(f.size for f in removed)
    stderr.print(f"removed {len(removed)} saved caches, {format_size(freed)} freed", markup=False)


def _conversation(key: str) -> int | None:
    return int(key) if key.isdigit() else None
