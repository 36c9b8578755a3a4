"""The engine in this process, behind the backend interface: models from the local store.

Importing this module loads no torch: the engine is imported when a chat opens, so a front end
that fails before that (a bad flag, no model) answers at once.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat_options import weight_format_for
from ..kv_files import ContextFiles
from ..models.errors import StoreError
from ..models.reply_defaults import ReplyDefaults, reply_defaults
from ..models.store import InstalledModel, ModelStore
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
    """`contexts`: where a chat keeps conversations' KV caches when they are left (instant
    resume, LocalChat.save_context); None keeps none."""

    def __init__(self, store: ModelStore, contexts: ContextFiles | None = None):
        self.store = store
        self.contexts = contexts

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(m.name, f"{m.manifest.weights}, {m.manifest.source}")
            for m in self.store.installed()
        ]

    def open_chat(self, spec: ChatSpec) -> LocalChat:
        from ..engine import ChatModel, EngineError, SamplingParams

        identity: dict[str, str] | None = None  # what a saved cache must have been made with
        if spec.shape is not None:  # random weights: nothing worth resuming
            name, defaults = spec.model, ReplyDefaults()
            folder = self._tokenizer_folder(spec)

            def load() -> ChatModel:
                return _random_model(spec, folder)
        else:
            try:
                installed = self.store.get(spec.model)
                installed.check_sizes()  # a truncated or missing file: named, before torch reads
                weights_folder, adjust = _weights_of(self.store, installed)
            except StoreError as error:
                raise ModelUnavailableError(str(error)) from None
            name, defaults = installed.name, reply_defaults(installed.path)
            recorded = installed.manifest.quantization
            manifest = installed.manifest
            identity = {  # a model pulled again under its name has another installed_at
                "model": name,
                "source": manifest.source,
                "revision": manifest.revision or "",
                "installed_at": manifest.installed_at,
            }

            def load() -> ChatModel:
                return ChatModel.load(
                    installed.path,
                    device=spec.device,
                    dtype=spec.dtype,
                    chat_format=spec.chat_format or defaults.chat_format,
                    quantization=weight_format_for(spec.weight_format, recorded),
                    threads=spec.threads,
                    weights_folder=weights_folder,
                    adjust=adjust,
                    source_bits=installed.manifest.source_bits,
                    quantized_cache=installed.quantized_cache,
                    gpus=spec.gpus,
                )

        if spec.gpus > 1 and (spec.concurrency > 1 or spec.kv_memory is not None):
            raise ModelUnavailableError(
                "a model split with --gpus writes one reply at a time for now, with no "
                "conversations kept beside it"
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
        chat = LocalChat(name, model, session, sampling, defaults, max_tokens)
        # A tensor-parallel model's cache is spread over its ranks: nothing to save here.
        if identity is not None and self.contexts is not None and spec.gpus == 1:
            chat.keep_contexts(self.contexts, identity)
        return chat

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
    model = random_model(spec.shape, str(device), dtype, quantization, spec.threads, spec.gpus)
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


# When a conversation's KV cache is worth saving (LocalChat.save_context). Reopening the
# conversation then costs reading its file instead of prefilling its tokens. The read rate is
# what benchmarks/resume_bench.py measured, file read, checksum and copy into the cache counted
# (docs/BENCHMARKS.md: 181 MiB in 161 ms on 2 CPU cores, 500 MiB in 540 ms on an H200's host):
# 1 GB/s. The prefill rate is the session's own, measured on its latest prefill of 64 tokens or
# more, else a typical one for the device (SmolLM2 on 2 CPU cores prefills ~400 tokens/s; the
# 8b shape on an H200 ~17,700). Saved only when the prefill it spares beats the read by
# MIN_GAIN_S, and for MIN_TOKENS or more: a short conversation prefills in a blink, and a
# GPU that prefills faster than the disk reads (the 8b shape on an H200: 4,064 tokens in 230 ms
# against 540 ms to load them) writes nothing, so leaving it is not made slower for nothing.
READ_RATE = 10**9  # bytes/s
MIN_GAIN_S = 0.2
MIN_TOKENS = 128
_TYPICAL_PREFILL_RATE = {"cpu": 500.0, "cuda": 20_000.0}  # tokens/s, before one is measured
LOCK_WAIT_S = 5.0  # how long saving or restoring waits for a reply to end (it was cancelled)


def worth_saving(tokens: int, size: int, prefill_rate: float | None) -> bool:
    """Whether a cache of `tokens` tokens and `size` bytes loads sooner than a session
    prefilling `prefill_rate` tokens/s computes them, by MIN_GAIN_S or more."""
    if tokens < MIN_TOKENS:
        return False
    if not prefill_rate:
        return True  # a device of unknown speed: a CPU-like one, the case that gains
    return tokens / prefill_rate - size / READ_RATE >= MIN_GAIN_S


class LocalChat(EngineChat):
    """One engine session: a KV cache reused across the turns of the conversation; callers on
    several threads are served one at a time."""

    continues_replies = True  # reads ReplyRequest.continue_reply

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
        self._contexts: ContextFiles | None = None  # where save_context writes; None: nowhere
        self._identity: dict[str, str] = {}
        # The token ids each file this chat wrote or read holds, by key.
        self._on_disk: dict[str, list[int]] = {}

    def keep_contexts(self, contexts: ContextFiles, identity: dict[str, str]) -> None:
        """Let save_context and restore_context use the files of `contexts`, for this model as
        `identity` describes it (its name and install); the weight format, dtype and device
        are added here."""
        model = self.model
        self._contexts = contexts
        self._on_disk = {}
        self._identity = {
            **identity,
            "weight_format": model.quantization or "none",
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": model.device.type,  # another device's kernels give other last bits
        }

    def save_context(self, key: str) -> int | None:
        """Write the KV cache of conversation `key` (what the session holds now) to its file,
        when loading it later will be faster than prefilling (see worth_saving); the tokens
        the file holds, None when nothing is saved. Evicts the least recently used files over
        the budget."""
        from ..engine.saved_cache import save

        contexts = self._contexts
        if contexts is None or not contexts.enabled or not hasattr(self, "session"):
            return None
        if not self._lock.acquire(timeout=LOCK_WAIT_S):  # a reply that does not stop
            return None
        try:
            session = self.session
            ids = session.cached_ids
            path = contexts.path_for(key, self._identity)
            held = self._on_disk.get(key)
            if held is not None and not path.exists():  # removed meanwhile (`cache clear`)
                del self._on_disk[key]
                held = None
            covered = len(held) if held is not None and ids[: len(held)] == held else 0
            if covered and len(ids) - covered < MIN_TOKENS:
                contexts.touch(path)  # it still holds all but a few of the tokens
                return covered
            size = len(ids) * session.cache.bytes_per_token
            rate = session.prefill_rate or _TYPICAL_PREFILL_RATE.get(self.model.device.type)
            if not contexts.fits(size) or not worth_saving(len(ids), size, rate):
                return None
            count = save(session, path, self._identity)
            self._on_disk[key] = list(ids)
        finally:
            self._lock.release()
        for removed in contexts.evict(keep=path):
            self._on_disk.pop(removed.key, None)
        return count

    def restore_context(self, key: str) -> int:
        """Put the KV cache saved for conversation `key` into the session, so that its next
        reply prefills only what follows; the tokens it holds, 0 when none was there or usable
        (then the reply prefills as ever). A file is used only for the token ids it holds, and
        only where the conversation's prompt begins with them (the session's common prefix);
        a damaged one is removed, one longer than this chat's context kept."""
        from ..engine.saved_cache import SavedCacheError, SavedCacheTooLongError, load

        contexts = self._contexts
        if contexts is None or not hasattr(self, "session"):  # closed
            return 0
        path = contexts.path_for(key, self._identity)
        if not path.exists():
            return 0
        if not self._lock.acquire(timeout=LOCK_WAIT_S):
            return 0
        try:
            session = self.session
            held = self._on_disk.get(key)
            if held is not None and session.cached_ids[: len(held)] == held:
                contexts.touch(path)  # the session still holds it, and perhaps more
                return len(held)
            try:
                count = load(session, path, self._identity)
            except SavedCacheTooLongError:  # for a larger --ctx: kept, prefilled here
                return 0
            except SavedCacheError:  # damaged or truncated: removed, prefilled instead
                self._on_disk.pop(key, None)
                path.unlink(missing_ok=True)
                return 0
            self._on_disk[key] = list(session.cached_ids)
            contexts.touch(path)
            return count
        finally:
            self._lock.release()

    def reply(
        self,
        messages: Sequence[ChatMessage],
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> LocalReply:
        continuing = request is not None and request.continue_reply
        reply = functools.partial(self.session.reply, continue_reply=continuing)
        return self._start(reply, self.with_system(messages), cancel, request)

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
        self.model.close()  # a split model's other processes stop now, not at exit
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


def _weights_of(store: ModelStore, installed: InstalledModel):
    """Where a model's weights are read from: its own folder, or for a created model whose
    adapters apply on loading its base's (create/loading.py, which imports torch)."""
    if installed.manifest.lineage is None or installed.manifest.lineage.merged:
        return installed.path, None
    from ..create.loading import weights_of

    return weights_of(store, installed)
