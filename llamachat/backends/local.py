"""The engine in this process, behind the backend interface: models from the local store.

Importing this module loads no torch: the engine is imported when a chat opens, so a front end
that fails before that (a bad flag, no model) answers at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat_options import weight_format_for
from ..models.errors import StoreError
from ..models.reply_defaults import ReplyDefaults, reply_defaults
from ..models.store import ModelStore
from .base import (
    BackendError,
    ChatLoad,
    ChatMessage,
    ChatSpec,
    ModelInfo,
    ModelUnavailableError,
    PromptTooLongError,
    ReplyRequest,
    ReplyStats,
    TokenLogprob,
)
from .engine_chat import EngineChat, LogprobTexts, reply_stats

if TYPE_CHECKING:
    from ..engine import ChatModel, ChatSession, Reply, SamplingParams
    from ..engine.tokenizer import Tokenizer


class ShapeError(ModelUnavailableError):
    """A shape of random weights that does not exist, or a tokenizer that does not fit it."""


class ContextSizeError(ModelUnavailableError):
    """The chat asked for a larger window than the model takes."""

    def __init__(self, requested: int, limit: int):
        self.requested = requested
        self.limit = limit
        super().__init__(f"ctx must be between 16 and the model's context length {limit}")

    def __reduce__(self):  # to cross to a server from its engine process intact
        return type(self), (self.requested, self.limit)


class KvMemoryError(BackendError):
    """ChatSpec.kv_memory holds fewer conversations than the chat writes at once."""


class LocalBackend:
    def __init__(self, store: ModelStore):
        self.store = store

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(m.name, f"{m.manifest.weights}, {m.manifest.source}")
            for m in self.store.installed()
        ]

    def open_chat(self, spec: ChatSpec) -> LocalChat:
        from ..engine import ChatModel, EngineError, SamplingParams

        if spec.shape is not None:
            name, defaults = spec.model, ReplyDefaults()
            folder = self._tokenizer_folder(spec)

            def load() -> ChatModel:
                return _random_model(spec, folder)
        else:
            try:
                installed = self.store.get(spec.model)
                installed.check_sizes()  # a truncated or missing file: named, before torch reads
            except StoreError as error:
                raise ModelUnavailableError(str(error)) from None
            name, defaults = installed.name, reply_defaults(installed.path)
            recorded = installed.manifest.quantization

            def load() -> ChatModel:
                return ChatModel.load(
                    installed.path,
                    device=spec.device,
                    dtype=spec.dtype,
                    chat_format=spec.chat_format,
                    quantization=weight_format_for(spec.weight_format, recorded),
                    threads=spec.threads,
                )

        try:
            model = load()
            if spec.ctx is not None and spec.ctx > model.context_length:
                raise ContextSizeError(spec.ctx, model.context_length)
            batched = spec.concurrency > 1 or spec.kv_memory is not None
            if batched:
                scheduler = _scheduler(model, spec)
            else:
                session = model.session(spec.ctx)
        except EngineError as error:
            raise ModelUnavailableError(str(error)) from None
        try:
            sampling = SamplingParams(**defaults.sampling_with(spec.sampling.chosen()))
        except ValueError as error:
            raise BackendError(str(error)) from None
        max_tokens = spec.max_tokens or defaults.max_tokens
        if batched:
            from .batched import BatchedChat

            return BatchedChat(name, model, scheduler, sampling, defaults, max_tokens)
        return LocalChat(name, model, session, sampling, defaults, max_tokens)

    def _tokenizer_folder(self, spec: ChatSpec) -> Path:
        """The folder whose tokenizer a shape's random model takes: spec.tokenizer names an
        installed model or a folder."""
        given = spec.tokenizer
        if given is None:
            raise ShapeError("random weights need a tokenizer: a model's name or folder")
        try:
            return self.store.get(given).path
        except StoreError:
            folder = Path(given).expanduser()
            if folder.is_dir():
                return folder
        raise ShapeError(f"no installed model or folder named {given!r} to take a tokenizer from")


def _random_model(spec: ChatSpec, folder: Path) -> ChatModel:
    """Random weights of spec.shape (engine/bench.py), with the tokenizer and chat format of the
    model in `folder`; its replies never end on their own (no end-of-sequence token), so each
    runs to its token limit, as a benchmark's should."""
    from ..engine.bench import SHAPES, random_model
    from ..engine.chat_format import chat_format_for
    from ..engine.loading import resolve_device, resolve_dtype
    from ..engine.quantize import resolve_quantization
    from ..engine.tokenizer import load_tokenizer

    shape = SHAPES.get(spec.shape or "")
    if shape is None:
        raise ShapeError(f"unknown shape {spec.shape!r}: use {', '.join(SHAPES)}")
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > shape["vocab_size"]:
        raise ShapeError(
            f"the tokenizer of {folder} has {len(tokenizer)} tokens, more than the"
            f" {shape['vocab_size']} of the {spec.shape} shape"
        )
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    quantization = resolve_quantization(weight_format_for(spec.weight_format, None), device, dtype)
    model = random_model(spec.shape, str(device), dtype, quantization, spec.threads)
    model.folder = folder
    model.tokenizer = _Folded(tokenizer)
    model.chat_format = chat_format_for(tokenizer, spec.chat_format)
    return model


class _Folded:
    """A tokenizer for a shape whose vocabulary is larger than its own: an id it lacks is shown
    as the id modulo its size, so that every token the random model draws has text."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._size = len(tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return self._size

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode([i % self._size for i in token_ids])


def _scheduler(model: ChatModel, spec: ChatSpec):
    """The slots of a chat that writes several replies at once: a conversation's worth of KV
    cache each, as many as `spec.kv_memory` holds (at least one per reply written at once)."""
    from ..engine.batching import BatchScheduler, slot_bytes

    window = model.window(spec.ctx)
    slots = spec.concurrency
    if spec.kv_memory is not None:
        each = slot_bytes(model, window)
        slots = spec.kv_memory // each
        if slots < spec.concurrency:
            raise KvMemoryError(
                f"{spec.kv_memory / 2**30:.1f} GiB of KV cache holds {slots} conversations of "
                f"{window} tokens ({each / 2**30:.2f} GiB each); {spec.concurrency} replies at "
                f"once need {spec.concurrency * each / 2**30:.1f} GiB"
            )
    return BatchScheduler(
        model, slots, window, prefill_tokens=spec.step_tokens, batch=spec.concurrency
    )


class LocalChat(EngineChat):
    """One engine session: a KV cache reused across the turns of the conversation; callers on
    several threads are served one at a time."""

    def __init__(
        self,
        name: str,
        model: ChatModel,
        session: ChatSession,
        sampling: SamplingParams,
        defaults: ReplyDefaults,
        max_tokens: int,
    ):
        super().__init__(name, model, session.ctx, sampling, defaults, max_tokens)
        self.session = session
        self._lock = threading.Lock()
        self._waiting = 0  # callers waiting for the lock, counted under _counting
        self._counting = threading.Lock()

    def reply(
        self,
        messages: Sequence[ChatMessage],
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> LocalReply:
        return self._start(self.session.reply, messages, cancel, request)

    def complete(
        self,
        prompt: str,
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> LocalReply:
        return self._start(self.session.complete, prompt, cancel, request)

    def _start(self, method, prompt, cancel, request: ReplyRequest | None) -> LocalReply:
        from ..engine import ContextOverflowError

        request = request or ReplyRequest()
        sampling, limit = self.settings_for(request)
        # One session, one cache: callers on other threads wait for the reply before theirs
        # to end (LocalReply lets go of the lock when its stream ends).
        with self._counting:
            self._waiting += 1
        self._lock.acquire()
        with self._counting:
            self._waiting -= 1
        try:
            reply = method(
                prompt,
                sampling,
                limit,
                stop=request.stop,
                cancel=cancel,
                top_logprobs=request.logprobs,
            )
        except ContextOverflowError as error:
            self._lock.release()
            raise PromptTooLongError(str(error)) from None
        except BaseException:
            self._lock.release()
            raise
        return LocalReply(reply, self._lock, self.token_logprob)

    def load(self) -> ChatLoad:
        running = int(self._lock.locked())
        return ChatLoad(
            running=running,
            waiting=self._waiting,
            last_batch=running,
            kv_tokens=len(self.session.cached_ids),
            kv_capacity=self.ctx,
        )

    def close(self) -> None:
        del self.session, self.model  # the cache and the weights go with the last reference


class LocalReply:
    def __init__(self, reply: Reply, lock: threading.Lock, as_text: Callable):
        self._reply = reply
        self._as_text = as_text  # an engine SampledLogprob → a TokenLogprob
        self._texts = LogprobTexts()
        self._read = 0  # of the engine's logprobs, those given to _texts
        self._logprobs: list[TokenLogprob] = []
        self._lock = lock  # the chat's, held from the start of this reply to its end
        self._held = True

    @property
    def dropped(self) -> tuple[int, ...]:
        return self._reply.dropped

    @property
    def prompt_tokens(self) -> int:
        return len(self._reply.prompt.token_ids)

    @property
    def stats(self) -> ReplyStats:
        return reply_stats(self._reply.stats)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return self._logprobs

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._reply:
                self._drawn()
                self._logprobs.extend(self._texts.piece(text))
                yield text
            self._drawn()
            self._logprobs.extend(self._texts.rest())
        finally:
            self._release()

    def _drawn(self) -> None:
        """The tokens the engine drew since the last look (it records them on this thread, as
        the iteration runs)."""
        measured = self._reply.logprobs
        for sampled in measured[self._read :]:
            self._texts.token(self._as_text(sampled))
        self._read = len(measured)

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def __del__(self) -> None:
        self._release()  # a reply never iterated must not keep the chat locked

    def watch(self, ready: Callable[[], None]) -> bool:
        return False  # the session writes as it is iterated: on the reader's thread

    def cancel(self) -> None:
        self._reply.cancel.set()
