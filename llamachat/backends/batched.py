"""A chat that writes many replies at once: each reply is one sequence of the engine's batch
scheduler (engine/batching.py), which decodes every running one in the same forward pass."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..models.reply_defaults import ReplyDefaults
from .base import (
    ChatLoad,
    ChatMessage,
    PromptTooLongError,
    ReplyRequest,
)
from .engine_chat import EngineChat, LogprobTexts, reply_stats
from .queued import QueuedReply

if TYPE_CHECKING:
    from ..engine import ChatModel, GenerationStats, Prompt, SamplingParams
    from ..engine.batching import BatchScheduler


class BatchedChat(EngineChat):
    continues_replies = True  # reads ReplyRequest.continue_reply

    def __init__(
        self,
        name: str,
        model: ChatModel,
        scheduler: BatchScheduler,
        sampling: SamplingParams,
        defaults: ReplyDefaults,
        max_tokens: int,
    ):
        super().__init__(name, model, scheduler.ctx, sampling, defaults, max_tokens)
        self.scheduler = scheduler

    def reply(
        self,
        messages: Sequence[ChatMessage],
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> BatchedReply:
        request = request or ReplyRequest()
        _, limit = self.settings_for(request)
        prompt = self._fitted(
            lambda fitter: fitter.fit(
                self.with_system(messages), limit, continue_reply=request.continue_reply
            )
        )
        return self._submit(prompt, request, request.stop + self.model.chat_format.stop, cancel)

    def complete(
        self,
        prompt: str,
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> BatchedReply:
        request = request or ReplyRequest()
        _, limit = self.settings_for(request)
        fitted = self._fitted(lambda fitter: fitter.raw(prompt, limit))
        return self._submit(fitted, request, request.stop, cancel)

    def _fitted(self, make) -> Prompt:
        from ..engine import ContextOverflowError
        from ..engine.prompts import PromptFitter

        try:
            return make(PromptFitter(self.model, self.ctx))
        except ContextOverflowError as error:
            raise PromptTooLongError(str(error)) from None

    def _submit(
        self,
        prompt: Prompt,
        request: ReplyRequest,
        stop: tuple[str, ...],
        cancel: threading.Event | None,
    ) -> BatchedReply:
        from ..engine.batching import BatchRequest

        sampling, _ = self.settings_for(request)
        texts = LogprobTexts() if request.logprobs is not None else None
        reply = BatchedReply(prompt, cancel or threading.Event(), texts)
        self.scheduler.submit(
            BatchRequest(
                prompt=prompt,
                sampling=sampling,
                stop=stop,
                on_piece=reply.piece,
                on_end=reply.ended,
                cancel=reply.cancel_event,
                on_error=reply.failed,
                top_logprobs=request.logprobs,
                on_logprob=(
                    (lambda sampled: texts.token(self.token_logprob(sampled))) if texts else None
                ),
            )
        )
        return reply

    def load(self) -> ChatLoad:
        usage = self.scheduler.usage()
        return ChatLoad(
            running=usage.running,
            waiting=usage.waiting,
            # The scheduler keeps the size of its latest decode step when it goes idle.
            last_batch=usage.last_batch if usage.running else 0,
            kv_tokens=usage.kv_tokens,
            kv_capacity=usage.kv_capacity,
        )

    def save_context(self, key: str) -> int | None:
        return None  # a server's chat: its slots keep finished conversations for reuse

    def restore_context(self, key: str) -> int:
        return 0

    def close(self) -> None:
        self.scheduler.close()
        del self.scheduler, self.model


class BatchedReply(QueuedReply):
    """One sequence of the scheduler's batch: the scheduler's thread puts its pieces."""

    def __init__(self, prompt: Prompt, cancel: threading.Event, texts: LogprobTexts | None):
        super().__init__(len(prompt.token_ids), prompt.dropped, cancel)
        self._texts = texts  # the scheduler thread's, with logprobs

    def piece(self, text: str) -> None:
        """The scheduler's next piece of text (from its thread)."""
        self.put_piece(text, self._texts.piece(text) if self._texts else [])

    def ended(self, measured: GenerationStats) -> None:
        """The scheduler's word that the sequence is over (from its thread)."""
        self.put_end(reply_stats(measured), self._texts.rest() if self._texts else [])

    def failed(self, error: BaseException) -> None:
        """The scheduler's word that the step writing this reply failed (from its thread)."""
        self.put_failure(error)
