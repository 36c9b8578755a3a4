"""A line-by-line chat on the terminal, like `ollama run`: the conversation is kept in one
engine session, so each turn prefills only its own tokens."""

from __future__ import annotations

import dataclasses
import sys

from .console import CliError, stderr
from .generation import print_stats, start
from .options import GenerationOptions

HELP = """commands:
  /bye          quit (Ctrl+D does too)
  /clear        forget the conversation
  /system TEXT  set the system prompt (and start over)
  /stats        toggle the token and speed line after each reply
Ctrl+C stops a reply; what was written is kept."""


def chat(options: GenerationOptions) -> None:
    conversation = start(options)
    model, session = conversation.model, conversation.session
    history: list[dict[str, str]] = []
    show_stats = options.verbose
    stderr.print(
        f"{conversation.installed.name} on {model.device} "
        f"({str(model.dtype).removeprefix('torch.')}), {session.ctx} tokens of context. "
        "/help for commands, /bye to quit.",
        markup=False,
    )
    from ..engine import ContextOverflowError

    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(use /bye or Ctrl+D to quit)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/bye":
                return
            if command == "/clear":
                history.clear()
            elif command == "/system":
                conversation = dataclasses.replace(conversation, system=argument.strip() or None)
                history.clear()
            elif command == "/stats":
                show_stats = not show_stats
            else:
                print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        messages = conversation.messages(history)
        try:
            reply = session.reply(messages, conversation.sampling, conversation.max_tokens)
        except ContextOverflowError as error:
            history.pop()
            stderr.print(f"llamachat: {error}", markup=False)
            continue
        if reply.dropped:
            stderr.print(
                f"(the {len(reply.dropped)} oldest messages no longer fit the context)",
                markup=False,
            )
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # Ctrl+C stops the reply; reply.text keeps what was shown, the cache stays valid
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.text})
        if show_stats:
            print_stats(reply.stats)


def ensure_terminal() -> None:
    if not sys.stdin.isatty():
        raise CliError(
            "the chat needs a terminal; pipe a question into `llamachat` for one answer", 2
        )
