"""A chat that writes many replies at once: each reply is one sequence of the engine's batch
scheduler (engine/batching.py), which decodes every running one in the same forward pass."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
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
from .engine_chat import EngineChat, LogprobTexts, reply_stats

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

    def close(self) -> None:
        self.scheduler.close()
        del self.scheduler, self.model


class BatchedReply:
    def __init__(self, prompt: Prompt, cancel: threading.Event, texts: LogprobTexts | None):
        self._prompt = prompt
        self.cancel_event = cancel
        # (text, the TokenLogprobs it came with), an error, or _END.
        self.pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stats = ReplyStats(prompt_tokens=len(prompt.token_ids))
        self._texts = texts  # the scheduler thread's, with logprobs
        self._rest: list[TokenLogprob] = []  # the tokens no text came with, at the end
        self.logprobs: list[TokenLogprob] = []  # extended by the iteration, with their text
        self._consumed = False
        self._ready: Callable[[], None] | None = None  # watch()'s, told of each item put
        self._putting = threading.Lock()

    @property
    def dropped(self) -> tuple[int, ...]:
        return self._prompt.dropped

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt.token_ids)

    @property
    def stats(self) -> ReplyStats:
        return self._stats

    def piece(self, text: str) -> None:
        """The scheduler's next piece of text (from its thread)."""
        self._put((text, self._texts.piece(text) if self._texts else []))

    def ended(self, measured: GenerationStats) -> None:
        """The scheduler's word that the sequence is over (from its thread)."""
        self._stats = reply_stats(measured)
        if self._texts:
            self._rest = self._texts.rest()
        self._put(_END)

    def failed(self, error: BaseException) -> None:
        """The scheduler's word that the step writing this reply failed (from its thread)."""
        self._put(error)

    def _put(self, item: object) -> None:
        with self._putting:
            self.pieces.put(item)
            ready = self._ready
        if ready is not None:
            ready()

    def watch(self, ready: Callable[[], None]) -> bool:
        """Each item of the queue is one step of the iteration: `ready` is called once per
        item, those already there included."""
        with self._putting:
            self._ready = ready
            queued = self.pieces.qsize()
        for _ in range(queued):
            ready()
        return True

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise RuntimeError("a reply can be streamed only once")
        self._consumed = True
        finished = False
        try:
            while (item := self.pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    finished = True
                    raise BackendError(f"the reply failed: {item}") from item
                assert isinstance(item, tuple)
                text, tokens = item
                self.logprobs.extend(tokens)
                yield text
            self.logprobs.extend(self._rest)
            finished = True
        finally:
            if not finished:  # the reader stopped early: the sequence leaves the batch
                self.cancel()

    def cancel(self) -> None:
        self.cancel_event.set()
