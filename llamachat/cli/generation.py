"""What the one-shot answer and the line chat share: the options resolved, the conversation to
continue, the chat opened through the backend, and the stats line."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from .. import remotes as remote_store
from ..backends.base import Chat, ChatInfo, ReplyStats
from ..backends.local import ContextSizeError
from ..backends.routing import Router
from ..chat_options import ChatOptions, chosen_model, resolve
from ..history.store import HistoryStore
from ..home import Home
from ..kv_files import ContextFiles, nearly_full
from ..models.store import ModelStore
from ..remotes import split_model
from ..settings import Settings, load
from .console import CliError, stderr, warn
from .options import GenerationOptions


@dataclass(frozen=True)
class Setup:
    """A chat opened on the chosen model (its info says what the flags, the config and the
    model decided), and the conversation to continue (with --continue) or None for a new one."""

    chat: Chat
    system: str | None  # a new conversation's, or the one --system sets on a continued one
    continued: int | None


def start(options: GenerationOptions, history: HistoryStore) -> Setup:
    home = Home.current()
    settings = load(home.config_file)
    chosen = resolve(options, settings, history)
    continued, continued_model = None, None
    system = chosen.new_system
    if chosen.continue_latest:
        latest = history.latest()
        if latest is None:
            raise CliError("there is no conversation to continue yet", exit_code=2)
        continued, continued_model = latest.id, latest.model
        system = chosen.system  # the conversation keeps its own unless one is given
        chosen = chosen.for_conversation(history.get(latest.id).settings)
    router = models_for(home, chosen, settings)
    name = chosen_model(chosen, router.store, continued_model, router.remotes)
    chat = open_chat(router, chosen, name)
    if continued is not None:
        chat.restore_context(str(continued))  # its saved KV cache: only the new turn prefills
    return Setup(chat=chat, system=system, continued=continued)


def models_for(home: Home, options: ChatOptions, settings: Settings) -> Router:
    """Every model `options` may open: installed, on a remote, or loaded by a server here."""
    return Router(
        ModelStore(home.models),
        remote_store.load(home.remotes_file),
        None if options.in_process else home.runtime,
        ContextFiles(home.kv, settings.kv_disk_budget_bytes),
    )


def keep_context(chat: Chat, conversation: int | None) -> None:
    """The conversation is left (the process ends, or /new): its KV cache is saved when that
    pays (Chat.save_context). A disk that refuses it costs only the saving, with a warning;
    none for a full disk, which the history's own warning has said (it writes first), since a
    cache not saved loses nothing but the time to prefill it again."""
    if conversation is None:
        return
    try:
        chat.save_context(str(conversation))
    except OSError as error:
        folder = Home.current().kv
        if not nearly_full(folder if folder.exists() else folder.parent):
            warn(f"the KV cache was not saved: {error}")


def open_chat(router: Router, options: ChatOptions, name: str) -> Chat:
    status = stderr.status(_opening(router, name)) if stderr.is_terminal else nullcontext()
    try:
        with status:
            return router.open_chat(options.spec(name))
    except ContextSizeError as error:
        raise CliError(
            f"--ctx {error.requested} is larger than the model's context of {error.limit}", 2
        ) from None


def _opening(router: Router, name: str) -> str:
    """What opening `name` does, for the terminal's spinner (piped, nothing is shown, and the
    running servers are not looked up twice)."""
    remote = split_model(name, router.remotes)
    if remote is not None:
        return f"reaching {remote[0].name}…"
    if router.server_for(name) is not None:
        return f"reaching the server that has {name} loaded…"
    return f"loading {name}…"


def open_history() -> HistoryStore:
    return HistoryStore(Home.current().history_db)


def app_options(options: GenerationOptions, theme: str | None) -> ChatOptions:
    """The chat app's options: the flags over the config file, checked before the app starts."""
    home = Home.current()
    return resolve(options, load(home.config_file), HistoryStore(home.history_db), theme)


def cut_notice(stats: ReplyStats, setup: Setup, options: GenerationOptions) -> str | None:
    """Why a reply ended before the model finished it, for stderr; None when it finished, was
    stopped by the user, or stopped at a --max-tokens given on this very command line."""
    if stats.finish_reason == "context":
        return "the answer was cut off: the context window is full (raise --ctx)"
    if stats.finish_reason == "length" and options.max_tokens is None:
        limit = setup.chat.info.max_tokens
        return f"the answer was cut off at its limit of {limit} tokens (raise --max-tokens)"
    return None


def print_stats(stats: ReplyStats, info: ChatInfo) -> None:
    """Like `ollama run --verbose`: on stderr, after the answer."""
    lines = [
        ("device", f"{info.device} {info.dtype}"),
        *([("threads", f"{info.threads}")] if info.threads else []),
        ("weight format", info.weight_format or "none"),
        ("prompt tokens", f"{stats.prompt_tokens}"),
        ("reused from cache", f"{stats.reused_tokens}"),
        ("prefilled", f"{stats.prefilled_tokens}"),
        ("time to first token", f"{stats.time_to_first_token_s * 1000:.0f} ms"),
        ("generated tokens", f"{stats.generated_tokens}"),
        ("decode rate", f"{stats.decode_tokens_per_s:.1f} tokens/s"),
        ("finish", stats.finish_reason or "-"),
    ]
    for label, value in lines:
        stderr.print(f"{label + ':':22}{value}", markup=False)
