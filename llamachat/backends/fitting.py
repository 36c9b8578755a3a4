"""A conversation fitted to a remote model's window on this side, as the local engine fits its
own (engine/prompts.py): the oldest turns left out until it fits with room for the reply, the
turns left out said, so the meter and the dimmed turns work for a remote model too.

The tokens are counted with the model's own tokenizer and template when the model is also
installed here; else by the server, where it counts conversations (vLLM's /tokenize, which
llamachat serve has too); else estimated from what the server counted of the last prompt (its
`usage`), scaled by the text's length. A conversation far from the window is not counted at
all: a one-shot question must not wait for a tokenizer to load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..engine.errors import ContextOverflowError
from ..engine.prompts import Prompt, PromptFitter, Templated
from .base import ChatMessage, ContextUse, PromptTooLongError

# Before the server has counted anything: a token a byte, the fewest bytes any byte-level
# tokenizer gives, so the estimate errs towards leaving a turn out, never towards a refusal.
FIRST_BYTES_PER_TOKEN = 1.0
# Tokens a template may add besides the text: each message's markup, a default system prompt.
MARKUP_PER_MESSAGE = 16
TEMPLATE_MARGIN = 256


class RemoteFitter:
    """`window`: the server's context length for the model (0: it does not say, and nothing is
    fitted); `twin`: opens the same model's tokenizer and template here, if it is installed;
    `server_count`: the server's count of a conversation's tokens, None where it has none."""

    def __init__(
        self,
        window: int,
        twin: Callable[[], Templated] | None,
        server_count: Callable[[Sequence[ChatMessage]], int | None],
    ):
        self.window = window
        self._open_twin = twin
        self._twin: Templated | None = None
        self._server_count: Callable[[Sequence[ChatMessage]], int | None] | None = server_count
        self._bytes_per_token = FIRST_BYTES_PER_TOKEN

    def fit(self, messages: Sequence[ChatMessage], max_tokens: int) -> Prompt:
        """The conversation to send (`dropped`: the messages left out) and the reply's limit
        in what the window leaves. Raises PromptTooLongError."""
        if not self.window:
            return Prompt(range(0), (), max_tokens)
        if _most_tokens(messages) + min(max_tokens, self.window // 4) <= self.window:
            return Prompt(range(self._estimate(messages)), (), max_tokens)  # fits, uncounted
        try:
            return PromptFitter(self._counter(), self.window).fit(messages, max_tokens)
        except ContextOverflowError as error:
            raise PromptTooLongError(str(error)) from None

    def use(self, messages: Sequence[ChatMessage]) -> ContextUse:
        if not messages or not self.window:
            return ContextUse(used=0, window=self.window)
        return ContextUse(used=len(self._counter().prompt_ids(messages)), window=self.window)

    def counted(self, messages: Sequence[ChatMessage], prompt_tokens: int) -> None:
        """What the server counted of `messages` (usage.prompt_tokens), for later estimates."""
        text = _bytes(messages)
        if prompt_tokens > 0 and text > 0:
            self._bytes_per_token = text / prompt_tokens

    def _counter(self) -> Templated:
        if self._open_twin is not None:
            if self._twin is None:
                self._twin = self._open_twin()
            return self._twin
        return _Counted(self)

    def _count(self, messages: Sequence[ChatMessage]) -> int:
        """The server's count where it gives one (asked once more only if it did), else the
        estimate."""
        if self._server_count is not None:
            count = self._server_count(messages)
            if count is not None:
                return count
            self._server_count = None
        return self._estimate(messages)

    def _estimate(self, messages: Sequence[ChatMessage]) -> int:
        return len(_Estimate(self._bytes_per_token).prompt_ids(messages))


class _Counted:
    """The fitter's count as a model's prompt_ids (a range: only its length is read)."""

    def __init__(self, fitter: RemoteFitter):
        self._fitter = fitter

    def encode(self, text: str) -> Sequence[int]:
        return _Estimate(self._fitter._bytes_per_token).encode(text)

    def prompt_ids(
        self, messages: Sequence[ChatMessage], continue_reply: bool = False
    ) -> Sequence[int]:
        # A reply left open lacks its end of turn and the next turn's opening: a few tokens.
        return range(self._fitter._count(messages))


class _Estimate:
    """Tokens as the text's UTF-8 length over bytes per token (a range of that length: only
    its length is ever read)."""

    def __init__(self, bytes_per_token: float):
        self.bytes_per_token = bytes_per_token

    def encode(self, text: str) -> Sequence[int]:
        return range(math.ceil(len(text.encode("utf-8")) / self.bytes_per_token))

    def prompt_ids(
        self, messages: Sequence[ChatMessage], continue_reply: bool = False
    ) -> Sequence[int]:
        return range(math.ceil(_bytes(messages) / self.bytes_per_token))


def _bytes(messages: Sequence[ChatMessage]) -> int:
    return sum(len(m["content"].encode("utf-8")) for m in messages)


def _most_tokens(messages: Sequence[ChatMessage]) -> int:
    """More tokens than the templated conversation can take: no token of a byte-level
    tokenizer is shorter than a byte."""
    return _bytes(messages) + MARKUP_PER_MESSAGE * len(messages) + TEMPLATE_MARGIN
