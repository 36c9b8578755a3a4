"""One-shot answers: the question comes on stdin (and/or as an argument), the answer goes to
stdout, streamed, and nothing else does. The exchange is saved to the history."""

from __future__ import annotations

import sys

from ..backends.base import PromptTooLongError
from ..history.recording import recorded
from ..history.store import ReplyRecorder
from .console import CliError, stdin_is_terminal, warn
from .generation import cut_notice, keep_context, open_history, print_stats, start
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
    history = open_history()
    setup = start(options, history)
    chat = setup.chat
    name = chat.info.model
    if setup.continued is None:
        conversation = history.create(model=name, system_prompt=setup.system)
    else:
        conversation = setup.continued
        if setup.system is not None and setup.system != history.get(conversation).system_prompt:
            history.set_system_prompt(conversation, setup.system)
        history.set_model(conversation, name)
    question_id = history.add_message(conversation, "user", question)
    messages = history.get(conversation).chat_messages()
    try:
        reply = chat.reply(messages)
    except PromptTooLongError as error:
        history.delete_from(conversation, question_id)  # nothing was answered
        limit = chat.info.context_length
        hint = f" (--ctx can go up to {limit})" if chat.info.context_size < limit else ""
        raise CliError(f"{error}{hint}") from None
    if reply.dropped:
        warn(f"the {len(reply.dropped)} oldest messages no longer fit the context")
    out = sys.stdout
    recorder = ReplyRecorder(history, conversation, name)
    try:
        for piece in recorded(reply, recorder):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        if options.verbose:  # what was produced before Ctrl+C, as ollama shows it too
            print(file=sys.stderr)
            print_stats(reply.stats, chat.info)
        raise
    out.write("\n")
    out.flush()
    if recorder.save_error:  # the answer was given all the same
        warn(recorder.save_error)
    if (notice := cut_notice(reply.stats, setup, options)) is not None:
        warn(notice)
    if options.verbose:
        print_stats(reply.stats, chat.info)
    keep_context(chat, conversation)  # for the next `-c`, after the answer was given
