"""A conversation as the prompt a context window holds: templated, the oldest turns dropped
until it fits with room for the reply; or raw text, as it is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .chat_format import ChatMessage
from .errors import ContextOverflowError


class Templated(Protocol):
    """What fitting needs of a model: its tokens for text, and for a templated conversation (a
    ChatModel; templated.Templating without the weights; a server's estimate, as a range)."""

    def encode(self, text: str) -> Sequence[int]: ...

    def prompt_ids(
        self, messages: Sequence[ChatMessage], continue_reply: bool = False
    ) -> Sequence[int]: ...


# Room kept for the reply when fitting a conversation: max_new_tokens, else this many, and never
# more than a quarter of the window, so that a generous limit does not push out the history.
DEFAULT_RESERVE = 512


@dataclass(frozen=True)
class Prompt:
    token_ids: Sequence[int]
    dropped: tuple[int, ...]  # indices of the caller's messages left out to fit the context
    max_new_tokens: int  # what the context leaves for the reply


class PromptFitter:
    def __init__(self, model: Templated, ctx: int):
        self.model = model
        self.ctx = ctx

    def fit(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int | None = None,
        continue_reply: bool = False,
    ) -> Prompt:
        """Template the conversation, dropping the oldest exchanges (never the system prompt)
        until it and the room for the reply fit the context; `continue_reply`: the last
        message, an assistant's, left open to be continued."""
        wanted = max_new_tokens if max_new_tokens is not None else DEFAULT_RESERVE
        reserve = min(wanted, self.ctx // 4)
        head = 1 if messages and messages[0]["role"] == "system" else 0
        start = head
        while True:
            ids = self.model.prompt_ids([*messages[:head], *messages[start:]], continue_reply)
            later_turn = next(
                (i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None
            )
            if len(ids) + reserve <= self.ctx or later_turn is None:
                break
            start = later_turn
        if len(ids) >= self.ctx:
            raise ContextOverflowError(self._overflow(messages[:head] + messages[-1:], len(ids)))
        room = self.ctx - len(ids)
        limit = room if max_new_tokens is None else min(max_new_tokens, room)
        return Prompt(ids, tuple(range(head, start)), limit)

    def _overflow(self, kept: Sequence[ChatMessage], total: int) -> str:
        """Which part of an unfittable prompt takes what: a template may add a default system
        prompt of its own (SmolLM2's does), which can be most of it."""
        labels = ("the system prompt", "the last message")[-len(kept) :]
        counts = [len(self.model.encode(message["content"])) for message in kept]
        parts = [f"{label} takes {_tokens(n)}" for label, n in zip(labels, counts, strict=True)]
        return (
            f"{' and '.join(parts)}, and the chat template adds {total - sum(counts)} (its markup"
            f" and any default system prompt): {total} tokens, more than the context of"
            f" {self.ctx}; shorten it or raise ctx"
        )

    def raw(self, text: str, max_new_tokens: int | None = None) -> Prompt:
        """`text` as it is, no chat template (what /v1/completions asks for). Raises
        ContextOverflowError when it alone fills the context."""
        ids = self.model.encode(text)
        if not ids or len(ids) >= self.ctx:
            raise ContextOverflowError(
                f"the prompt takes {_tokens(len(ids))}; it must take between 1 and"
                f" {self.ctx - 1} tokens of the context of {self.ctx}"
            )
        room = self.ctx - len(ids)
        limit = room if max_new_tokens is None else min(max_new_tokens, room)
        return Prompt(ids, (), limit)


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"
