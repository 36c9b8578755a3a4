"""A chat that writes many replies at once: each reply is one sequence of the engine's batch
scheduler (engine/batching.py), which decodes every running one in the same forward pass."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..models.reply_defaults import ReplyDefaults
from .base import (
    BackendError,
    ChatLoad,
    ChatMessage,
    PromptTooLongError,
    ReplyRequest,
    ReplyStats,
    TokenLogprob,
)
from .engine_chat import EngineChat, reply_stats

if TYPE_CHECKING:
    from ..engine import ChatModel, GenerationStats, Prompt, SamplingParams
    from ..engine.batching import BatchScheduler

_END = object()  # what the reply's queue holds after its last piece


class BatchedChat(EngineChat):
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
        prompt = self._fitted(lambda fitter: fitter.fit(messages, limit))
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
        reply = BatchedReply(prompt, cancel or threading.Event())
        wanted = request.logprobs is not None
        self.scheduler.submit(
            BatchRequest(
                prompt=prompt,
                sampling=sampling,
                stop=stop,
                on_piece=reply.pieces.put,
                on_end=reply.ended,
                cancel=reply.cancel_event,
                on_error=reply.failed,
                top_logprobs=request.logprobs,
                on_logprob=(
                    (lambda sampled: reply.logprobs.append(self.token_logprob(sampled)))
                    if wanted
                    else None
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

    def close(self) -> None:
        self.scheduler.close()
        del self.scheduler, self.model


class BatchedReply:
    def __init__(self, prompt: Prompt, cancel: threading.Event):
        self._prompt = prompt
        self.cancel_event = cancel
        self.pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stats = ReplyStats(prompt_tokens=len(prompt.token_ids))
        self.logprobs: list[TokenLogprob] = []  # appended by the scheduler's thread
        self._consumed = False

    @property
    def dropped(self) -> tuple[int, ...]:
        return self._prompt.dropped

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt.token_ids)

    @property
    def stats(self) -> ReplyStats:
        return self._stats

    def ended(self, measured: GenerationStats) -> None:
        """The scheduler's word that the sequence is over (from its thread)."""
        self._stats = reply_stats(measured)
        self.pieces.put(_END)

    def failed(self, error: BaseException) -> None:
        """The scheduler's word that the step writing this reply failed (from its thread)."""
        self.pieces.put(error)

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise RuntimeError("a reply can be streamed only once")
        self._consumed = True
        finished = False
        try:
            while (piece := self.pieces.get()) is not _END:
                if isinstance(piece, BaseException):
                    finished = True
                    raise BackendError(f"the reply failed: {piece}") from piece
                assert isinstance(piece, str)
                yield piece
            finished = True
        finally:
            if not finished:  # the reader stopped early: the sequence leaves the batch
                self.cancel()

    def cancel(self) -> None:
        self.cancel_event.set()
