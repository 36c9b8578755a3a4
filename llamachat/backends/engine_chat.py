"""What the engine's two chats share (one session, local.LocalChat; many replies at once,
batched.BatchedChat): their info, the sampling a reply runs with, and context use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..models.reply_defaults import ReplyDefaults
from .base import (
    BackendError,
    ChatInfo,
    ChatMessage,
    ContextUse,
    Logprob,
    ReplyRequest,
    ReplyStats,
    TokenLogprob,
)

if TYPE_CHECKING:
    from ..engine import ChatModel, GenerationStats, SamplingParams
    from ..engine.sampling import SampledLogprob


class EngineChat:
    continues_replies = False  # reads ReplyRequest.continue_reply (ChatInfo says it)

    def __init__(
        self,
        name: str,
        model: ChatModel,
        ctx: int,
        sampling: SamplingParams,
        defaults: ReplyDefaults,
        max_tokens: int,
    ):
        self.name = name
        self.model = model  # the engine's, for tests and tools that look inside
        self.ctx = ctx
        self.sampling = sampling
        self.defaults = defaults  # the model's advice, under a reply's own sampling
        self.max_tokens = max_tokens

    @property
    def info(self) -> ChatInfo:
        # Made anew each time: the default thread count follows the load on the machine.
        model = self.model
        return ChatInfo(
            model=self.name,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            weight_format=model.quantization,
            threads=model.threads,
            context_size=self.ctx,
            context_length=model.context_length,
            max_tokens=self.max_tokens,
            continues_replies=self.continues_replies,
        )

    def settings_for(self, request: ReplyRequest) -> tuple[SamplingParams, int]:
        """The sampling and token limit of one reply: its own over the chat's."""
        from ..engine import SamplingParams

        sampling = self.sampling
        if request.sampling is not None:
            sampling = SamplingParams(**self.defaults.sampling_with(request.sampling.chosen()))
        return sampling, request.max_tokens or self.max_tokens

    def with_system(self, messages: Sequence[ChatMessage]) -> Sequence[ChatMessage]:
        """The conversation as the model sees it: led by the model's own system prompt (a
        created model's SYSTEM) when it has none of its own, as ollama's Modelfile does."""
        system = self.defaults.system
        if system is None or (messages and messages[0].get("role") == "system"):
            return messages
        return [{"role": "system", "content": system}, *messages]

    def token_logprob(self, sampled: SampledLogprob) -> TokenLogprob:
        """The engine's token ids as text."""
        return TokenLogprob(
            chosen=self._logprob(sampled.token_id, sampled.logprob),
            top=tuple(self._logprob(i, value) for i, value in sampled.top),
        )

    def _logprob(self, token_id: int, value: float) -> Logprob:
        text = self.model.decode([token_id])
        return Logprob(text, value, tuple(text.encode("utf-8")))

    def context_use(self, messages: Sequence[ChatMessage]) -> ContextUse:
        from ..engine import EngineError

        try:
            used = len(self.model.prompt_ids(self.with_system(messages))) if messages else 0
        except EngineError as error:  # the chat template rejects the conversation
            raise BackendError(str(error)) from None
        return ContextUse(used=used, window=self.ctx)


class LogprobTexts:
    """One reply's TokenLogprobs, each given the text it came out with: on the thread that
    makes the reply, `token` as each token is drawn, then `piece` with the text it released."""

    def __init__(self) -> None:
        self.pending: list[TokenLogprob] = []  # drawn since the last piece

    def token(self, logprob: TokenLogprob) -> None:
        self.pending.append(logprob)

    def piece(self, text: str) -> list[TokenLogprob]:
        """The tokens that `text` came out with: the latest one has it, those before "" (their
        text was held until it). Text released at the very end, after its token's own piece
        (a possible stop string the reply ended on), has no token left to go with."""
        tokens = self.rest()
        if tokens:
            tokens[-1] = replace(tokens[-1], text=tokens[-1].text + text)
        return tokens

    def rest(self) -> list[TokenLogprob]:
        """The tokens drawn since the last piece (at the end: those of a stop string)."""
        tokens, self.pending = self.pending, []
        return tokens


def reply_stats(measured: GenerationStats) -> ReplyStats:
    """What the engine measured of a reply, as the interface gives it."""
    return ReplyStats(
        prompt_tokens=measured.prompt_tokens,
        reused_tokens=measured.reused_tokens,
        prefilled_tokens=measured.prefilled_tokens,
        generated_tokens=measured.generated_tokens,
        time_to_first_token_s=measured.time_to_first_token_s,
        decode_s=measured.decode_s,
        finish_reason=measured.finish_reason,
    )
