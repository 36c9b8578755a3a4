"""A line-by-line chat on the terminal, like `ollama run`: the conversation is kept in one
engine session, so each turn prefills only its own tokens."""

from __future__ import annotations

import sys

from ..home import Home
from ..models.store import ModelStore
from .console import CliError, stderr
from .generation import (
    context_size,
    installed_model,
    load_model,
    load_settings,
    max_tokens,
    print_stats,
    sampling_params,
    system_prompt,
)
from .options import GenerationOptions

HELP = """commands:
  /bye          quit (Ctrl+D does too)
  /clear        forget the conversation
  /system TEXT  set the system prompt (and start over)
  /stats        toggle the token and speed line after each reply
Ctrl+C stops a reply; what was written is kept."""


def chat(options: GenerationOptions) -> None:
    home = Home.current()
    settings = load_settings(home)
    installed = installed_model(ModelStore(home.models), settings, options.model)
    sampling = sampling_params(options, settings)
    model = load_model(installed, options, settings)
    session = model.session(context_size(options, settings, model))
    system = system_prompt(options, settings)
    history: list[dict[str, str]] = []
    show_stats = options.verbose
    stderr.print(
        f"{installed.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), "
        f"{session.ctx} tokens of context. /help for commands, /bye to quit.",
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
                system, history = argument.strip() or None, []
            elif command == "/stats":
                show_stats = not show_stats
            else:
                print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply = session.reply(messages, sampling, max_tokens(options, settings))
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
