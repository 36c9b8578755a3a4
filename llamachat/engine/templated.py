"""A model's tokenizer and chat format without its weights (no torch): how many tokens a
conversation takes for a copy of the model that runs elsewhere (a server), so the client can
fit the conversation to that server's window as it would its own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .chat_format import ChatMessage, chat_format_for, render
from .tokenizer import load_tokenizer


class Templating:
    def __init__(self, folder: Path, chat_format: str | None = None):
        self.tokenizer = load_tokenizer(folder)
        self.chat_format = chat_format_for(self.tokenizer, chat_format)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt_ids(
        self, messages: Sequence[ChatMessage], continue_reply: bool = False
    ) -> list[int]:
        """The prompt's ids; `continue_reply`: the last message, an assistant's, left open."""
        return self.encode(render(self.tokenizer, self.chat_format, messages, continue_reply))
