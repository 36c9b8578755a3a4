"""One-shot answers: the question comes on stdin (and/or as an argument), the answer goes to
stdout, streamed, and nothing else does."""

from __future__ import annotations

import sys

from .console import CliError, stdin_is_terminal, warn
from .generation import print_stats, start
from .options import GenerationOptions


def read_question(prompt: str | None) -> str:
    """The prompt argument first, then whatever was piped in, as `cat notes | llamachat ask
    "summarise this"` expects. Invalid UTF-8 is replaced, with a warning."""
    piped = ""
    if not stdin_is_terminal():
        data = sys.stdin.buffer.read()
        try:
            piped = data.decode("utf-8")
        except UnicodeDecodeError:
            warn("stdin is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
            piped = data.decode("utf-8", errors="replace")
    parts = [part for part in (prompt, piped) if part and part.strip()]
    if not parts:
        raise CliError("nothing to answer: stdin was empty and no prompt was given", exit_code=2)
    return "\n\n".join(part.strip("\n") for part in parts)


def answer(prompt: str | None, options: GenerationOptions) -> None:
    question = read_question(prompt)
    chat = start(options)
    messages = chat.messages([{"role": "user", "content": question}])
    from ..engine import ContextOverflowError

    try:
        reply = chat.session.reply(messages, chat.sampling, max_new_tokens=chat.max_tokens)
    except ContextOverflowError as error:
        limit = chat.model.context_length
        hint = f" (--ctx can go up to {limit})" if chat.session.ctx < limit else ""
        raise CliError(f"{error}{hint}") from None
    out = sys.stdout
    for piece in reply:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if reply.stats.finish_reason == "context":
        warn("the answer was cut off: the context window is full (raise --ctx)")
    if options.verbose:
        print_stats(reply.stats)
