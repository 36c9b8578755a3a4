"""A line-by-line chat on the terminal, like `ollama run` (`llamachat chat --plain`): one engine
session, so each turn prefills only its own tokens, and the same history as the chat app."""

from __future__ import annotations

import sys

from ..backends.base import PromptTooLongError
from ..history.recording import recorded
from ..history.store import HistoryStore, ReplyRecorder
from .console import CliError, stderr, warn
from .generation import Setup, cut_notice, keep_context, open_history, print_stats, start
from .options import GenerationOptions

HELP = """commands:
  /bye          quit (Ctrl+D does too)
  /new          start a new conversation
  /system TEXT  set the system prompt; it applies from the next turn
  /stats        toggle the token and speed lines after each reply
Ctrl+C stops a reply; what was written is kept."""


def chat(options: GenerationOptions) -> None:
    history = open_history()
    setup = start(options, history)
    chat = setup.chat
    info = chat.info
    name = info.model
    conversation = setup.continued
    pending_system = setup.system  # for the conversation the first message creates
    weights = f", {info.weight_format} weights" if info.weight_format else ""
    stderr.print(
        f"{name} on {info.device} ({info.dtype}{weights}), "
        f"{info.context_size} tokens of context. /help for commands, /bye to quit.",
        markup=False,
    )

    conversation = _converse(setup, history, conversation, pending_system, options)
    keep_context(chat, conversation)  # /bye or Ctrl+D: saved for the next -c, when it pays


def _converse(
    setup: Setup,
    history: HistoryStore,
    conversation: int | None,
    pending_system: str | None,
    options: GenerationOptions,
) -> int | None:
    """Read and answer lines until /bye or the end of input; the conversation open then."""
    chat = setup.chat
    name = chat.info.model
    show_stats = options.verbose
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return conversation
        except KeyboardInterrupt:
            print("\n(use /bye or Ctrl+D to quit)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/bye":
                return conversation
            if command == "/new":
                keep_context(chat, conversation)
                conversation = None
            elif command == "/system":
                pending_system = argument.strip() or None
                if conversation is not None:
                    history.set_system_prompt(conversation, pending_system or "")
            elif command == "/stats":
                show_stats = not show_stats
            else:
                print(HELP, file=sys.stderr)
            continue
        if conversation is None:
            conversation = history.create(model=name, system_prompt=pending_system)
        question = history.add_message(conversation, "user", text)
        try:
            reply = chat.reply(history.get(conversation).chat_messages())
        except PromptTooLongError as error:
            history.delete_from(conversation, question)
            stderr.print(f"llamachat: {error}", markup=False)
            continue
        if reply.dropped:
            stderr.print(
                f"(the {len(reply.dropped)} oldest messages no longer fit the context)",
                markup=False,
            )
        recorder = ReplyRecorder(history, conversation, name)
        try:
            for piece in recorded(reply, recorder):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # Ctrl+C stops the reply; what was shown is saved, the cache stays valid
        sys.stdout.write("\n")
        if recorder.save_error:  # the reply was shown all the same
            sys.stdout.flush()
            warn(recorder.save_error)
        if (notice := cut_notice(reply.stats, setup, options)) is not None:
            stderr.print(f"({notice})", markup=False)
        if show_stats:
            print_stats(reply.stats, chat.info)


def ensure_terminal() -> None:
    if not sys.stdin.isatty():
        raise CliError(
            "the chat needs a terminal; pipe a question into `llamachat` for one answer", 2
        )
