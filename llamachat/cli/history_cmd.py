"""`llamachat history`: the conversations that the chat app, the line chat and pipes share."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..backends.base import Sampling
from ..history.conversation_settings import MIN_CTX, ConversationSettings
from ..history.export import to_json, to_markdown, to_outline
from ..history.store import Conversation, HistoryStore
from ..home import Home
from ..kv_files import ContextFiles, format_size
from .console import CliError, stderr, stdin_is_terminal, stdout

app = typer.Typer(help="List, show, search, export and remove saved conversations.")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
IdArgument = Annotated[int, typer.Argument(help="A conversation's number (see `history list`).")]


def _store() -> HistoryStore:
    return HistoryStore(Home.current().history_db)


def _get(store: HistoryStore, conversation_id: int) -> Conversation:
    try:
        return store.get(conversation_id)
    except KeyError:
        raise CliError(
            f"no conversation {conversation_id} (`llamachat history list` shows them)"
        ) from None


@app.command("list")
def list_conversations(as_json: JsonOption = False) -> None:
    """Conversations, newest first; KV CACHE: the size of its saved cache (`llamachat cache`)."""
    conversations = _store().conversations()
    cached = ContextFiles(Home.current().kv).sizes_by_key()
    if as_json:
        listed = [{**asdict(c), "kv_cache_bytes": cached.get(str(c.id), 0)} for c in conversations]
        stdout.print_json(json.dumps(listed, ensure_ascii=False))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "UPDATED", "MESSAGES", "MODEL", "KV CACHE", "TITLE"):
        table.add_column(column, no_wrap=column != "TITLE")
    for c in conversations:
        size = cached.get(str(c.id))
        table.add_row(
            str(c.id),
            _when(c.updated_at),
            str(c.message_count),
            c.model or "-",
            format_size(size) if size else "-",
            c.title,
        )
    stdout.print(table)


@app.command("show")
def show(
    conversation_id: IdArgument,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: every branch, and the active path.")
    ] = False,
    tree: Annotated[
        bool,
        typer.Option(
            "--tree", help="Print every branch, a message a line; * marks the active path."
        ),
    ] = False,
    at: Annotated[
        int | None,
        typer.Option(
            "--at",
            metavar="MESSAGE_ID",
            help="First make the branch of this message (a search hit's) the active path, "
            "where that branch was left: what the model sees next, -c too.",
        ),
    ] = None,
) -> None:
    """Print a conversation: the path the model sees, as Markdown (or JSON, or --tree)."""
    store = _store()
    conversation = _get(store, conversation_id)
    if at is not None:
        if at not in {message.id for message in conversation.tree}:
            raise CliError(
                f"conversation {conversation_id} has no message {at} "
                f"(`llamachat history show {conversation_id} --tree` shows them)"
            )
        store.activate(at)
        conversation = _get(store, conversation_id)
    if as_json:
        text = to_json(conversation)
    else:
        text = to_outline(conversation) if tree else to_markdown(conversation)
    stdout.print(text, markup=False, highlight=False, end="")


@app.command("export")
def export(
    conversation_id: IdArgument,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    format: Annotated[
        str,
        typer.Option("--format", "-f", help="md (the active path) or json (every branch)."),
    ] = "md",
) -> None:
    """Export a conversation as Markdown (the path the model sees) or JSON (every branch)."""
    if format not in ("md", "json"):
        raise CliError(f"unknown format {format!r}: use md or json", exit_code=2)
    conversation = _get(_store(), conversation_id)
    text = to_json(conversation) if format == "json" else to_markdown(conversation)
    if output is None:
        stdout.print(text, markup=False, highlight=False, end="")
        return
    output.write_text(text, encoding="utf-8")
    stderr.print(f"wrote {output}", markup=False)


@app.command("set")
def set_settings(
    conversation_id: IdArgument,
    temperature: Annotated[float | None, typer.Option(help="0 is greedy.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p")] = None,
    repeat_penalty: Annotated[float | None, typer.Option("--repeat-penalty")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1)] = None,
    ctx: Annotated[int | None, typer.Option(min=MIN_CTX, help="Context window in tokens.")] = None,
    unset: Annotated[
        list[str] | None,
        typer.Option("--unset", metavar="NAME", help="Forget one (temperature, top_p…)."),
    ] = None,
) -> None:
    """Give a conversation settings of its own, used when it is continued (-c, the app);
    flags still win. With no option, print them."""
    store = _store()
    current = _get(store, conversation_id).settings
    given = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repeat_penalty": repeat_penalty,
        "max_tokens": max_tokens,
        "ctx": ctx,
    }
    for name in unset or []:
        if name.replace("-", "_") not in given:
            raise CliError(f"no setting {name!r}: use {', '.join(given)}", exit_code=2)
    if not unset and all(v is None for v in given.values()):
        stdout.print(current.described() or "none of its own", markup=False, highlight=False)
        return
    values = current.chosen() | {k: v for k, v in given.items() if v is not None}
    for name in unset or []:
        values.pop(name.replace("-", "_"), None)
    sampled = {k: v for k, v in values.items() if k not in ("max_tokens", "ctx")}
    try:
        Sampling(**sampled)  # the ranges every front end checks
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None
    chosen = ConversationSettings(**values)
    store.set_settings(conversation_id, chosen)
    described = chosen.described() or "none of its own"
    stderr.print(f"conversation {conversation_id}: {described}", markup=False)


@app.command("rm")
def remove(
    conversation_id: IdArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a conversation."""
    store = _store()
    conversation = _get(store, conversation_id)
    if not yes:
        if not stdin_is_terminal():
            raise CliError(
                f"not deleting conversation {conversation_id} without --yes", exit_code=2
            )
        title = conversation.summary.title or "untitled"
        if not typer.confirm(f"Delete conversation {conversation_id} ({title})?", err=True):
            raise typer.Exit(1)
    store.delete(conversation_id)
    ContextFiles(Home.current().kv).remove_key(str(conversation_id))
    stderr.print(f"deleted conversation {conversation_id}", markup=False)


@app.command("search")
def search(
    text: Annotated[str, typer.Argument(help="Text to find in any message, on any branch.")],
    as_json: JsonOption = False,
) -> None:
    """Find messages containing TEXT, on any branch of any conversation."""
    hits = _store().search(text)
    if as_json:
        stdout.print_json(json.dumps([asdict(hit) for hit in hits], ensure_ascii=False))
        return
    if not hits:
        stderr.print(f"nothing matches {text!r}", markup=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "MESSAGE", "BRANCH", "ROLE", "TITLE", "MATCH"):
        table.add_column(column, no_wrap=column not in ("TITLE", "MATCH"))
    for hit in hits:
        branch = "active" if hit.active else "other"
        table.add_row(
            str(hit.conversation_id), str(hit.message_id), branch, hit.role, hit.title, hit.snippet
        )
    stdout.print(table)
    if not all(hit.active for hit in hits):
        stderr.print(
            "a hit on another branch: `llamachat history show ID --at MESSAGE` makes it active",
            markup=False,
        )


def _when(timestamp: str) -> str:
    return timestamp[:16].replace("T", " ")
