"""What a front end asks of a model, whoever runs it: the interface every backend implements.

The one-shot answer, the line chat and the chat app talk only to these types. The first backend
is the engine in this process (local.py); a remote one (any OpenAI-compatible server) and
`llamachat serve` speak the same interface, so everything here is plain data: no torch types, a
conversation as OpenAI's list of {"role", "content"} messages (the system prompt, if any, is the
first one), errors as the classes below.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, Protocol

ChatMessage = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
# stop: the model ended its turn (or a stop string); length: the reply's token limit;
# context: the context window is full; cancelled: the caller stopped it.
FinishReason = Literal["stop", "length", "context", "cancelled"]


class BackendError(Exception):
    """Anything a backend reports to a front end, as one line the user can act on."""


class ModelUnavailableError(BackendError):
    """The model cannot be opened: missing or damaged files, an unsupported architecture, a
    device or dtype this machine lacks."""


class BackendGoneError(BackendError):
    """What runs the model (a process, a server) is gone: the reply cannot be written."""


class PromptTooLongError(BackendError):
    """What cannot be dropped from the conversation (the system prompt and the last message)
    does not fit the context window; nothing was generated."""


@dataclass(frozen=True)
class Sampling:
    """The sampling fields the user chose; None leaves a field to the model's recommendation,
    else the backend's default. temperature 0 is greedy."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None  # OpenAI's, over the reply so far
    presence_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature, lambda v: v >= 0, "temperature must be ≥ 0"),
            (self.top_k, lambda v: v >= 0, "top_k must be ≥ 0"),
            (self.top_p, lambda v: 0 < v <= 1, "top_p must be in (0, 1]"),
            (self.min_p, lambda v: 0 <= v < 1, "min_p must be in [0, 1)"),
            (self.repeat_penalty, lambda v: v > 0, "repeat_penalty must be > 0"),
            (
                self.frequency_penalty,
                lambda v: -2 <= v <= 2,
                "frequency_penalty must be in [-2, 2]",
            ),
            (self.presence_penalty, lambda v: -2 <= v <= 2, "presence_penalty must be in [-2, 2]"),
            (self.seed, lambda v: 0 <= v < 2**64, "seed must be in [0, 2**64)"),
        ]
        for value, ok, message in checks:
            if value is not None and not ok(value):
                raise ValueError(message)

    def chosen(self) -> dict[str, float | int]:
        """The fields that were set, by name."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


def _penalty(value: float) -> bool:
    return -2 <= value <= 2


@dataclass(frozen=True)
class ChatSpec:
    """What to open: a model by the backend's name for it, and how to run it. The placement
    fields (device, dtype, threads, chat format) are for backends that load the model
    themselves; None leaves a field to the model's own record, else the backend's default."""

    model: str
    ctx: int | None = None  # the context window in tokens
    weight_format: str | None = None  # auto, none, int8, int4, fp8, f16
    sampling: Sampling = Sampling()
    max_tokens: int | None = None  # most tokens in one reply
    device: str = "auto"
    dtype: str | None = None
    threads: int | None = None
    gpus: int = 1  # GPUs to split the model over (tensor parallel), a process each
    chat_format: str | None = None
    # Replies the chat may write at once (a server's); 1: one at a time, callers wait their turn.
    concurrency: int = 1
    # With concurrency > 1: bytes of KV cache to hold conversations in, running or finished
    # (kept for the clients that come back); None: just enough for `concurrency` of them.
    kv_memory: int | None = None
    # With concurrency > 1: rows a step takes at most (decoding rows and prompt tokens); None:
    # the engine's default for the device.
    step_tokens: int | None = None
    # Random weights of this engine shape ("8b") instead of an installed model, for benchmarks
    # (the chat goes by `model`), with the tokenizer and chat format of `tokenizer`: an
    # installed model's name or a model folder.
    shape: str | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class ReplyRequest:
    """One reply's own settings, over those the chat was opened with (what a request to a
    server carries)."""

    sampling: Sampling | None = None  # None: the chat's
    max_tokens: int | None = None  # None: the chat's limit
    stop: tuple[str, ...] = ()  # strings that end the reply (not included in it)
    # Log probabilities of the reply's tokens with this many alternatives each (0 to 20);
    # None: none.
    logprobs: int | None = None
    # The last message is an assistant's reply to go on with: the prompt ends with its text,
    # left open, and the reply is what follows it (vLLM's continue_final_message). Read by
    # every chat of the engine and the remote one (ChatInfo.continues_replies says which can).
    continue_reply: bool = False


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str  # what the user picks it by, besides the name (weights, source)


@dataclass(frozen=True)
class ChatInfo:
    """What an opened chat runs with, every default decided."""

    model: str
    device: str  # where it runs: "cpu", "cuda:0"
    dtype: str  # the arithmetic's: "float32", "bfloat16"
    weight_format: str | None  # None: the weights as stored
    threads: int | None  # CPU threads; None where the backend does not say (a GPU)
    context_size: int  # this chat's window in tokens
    context_length: int  # the most the model takes
    max_tokens: int  # the reply's token limit
    continues_replies: bool = False  # reads ReplyRequest.continue_reply


@dataclass(frozen=True)
class Logprob:
    token: str  # the token's text alone (U+FFFD where it is part of a character)
    logprob: float
    bytes: tuple[int, ...]  # its UTF-8 bytes


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a reply: its log probability, and the most likely tokens' in its place."""

    chosen: Logprob
    top: tuple[Logprob, ...]
    # The reply's text that came out with this token: "" for one whose text is held back (the
    # start of a character that a later token ends, or of a possible stop string), which then
    # comes with the token that releases it. A reply's token texts join to its text.
    text: str = ""


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens found in a cache, not computed again
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0  # from the request to the first token
    decode_s: float = 0.0  # from the first token to the last
    finish_reason: FinishReason | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class ChatLoad:
    """What a chat is doing at one moment (a server's metrics)."""

    running: int  # replies being written: decoding, or their prompt being read
    waiting: int  # replies asked for, waiting their turn
    last_batch: int  # replies the latest decode step wrote at once; 0 while none runs
    kv_tokens: int  # tokens whose keys and values the chat holds, running or kept for reuse
    kv_capacity: int  # tokens it can hold


@dataclass(frozen=True)
class ContextUse:
    used: int  # tokens the whole conversation takes, templated
    window: int  # the chat's context size


class Reply(Protocol):
    """One assistant reply: iterate it (once) for text pieces, never half a character. `stats`
    fills in as it streams and is final once the iteration ends, however it ends."""

    @property
    def dropped(self) -> tuple[int, ...]:
        """Indices of the messages left out to fit the context window."""
        ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def stats(self) -> ReplyStats: ...

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """With ReplyRequest.logprobs: one per token so far, in order, each there by the time
        the iteration yields the text it came with; else empty."""
        ...

    def __iter__(self) -> Iterator[str]: ...

    def watch(self, ready: Callable[[], None]) -> bool:
        """Rather than block a thread in the iteration: have `ready` called, from the
        backend's own thread, once for each step of the iteration (a piece, its end, or its
        failure) that is then there to take without waiting. False where this reply cannot:
        iterate it on a thread."""
        ...

    def cancel(self) -> None:
        """Stop the reply from any thread; the iteration ends within a token."""
        ...


class Chat(Protocol):
    """A model opened for one conversation at a time. Each reply is given the whole
    conversation; a backend may reuse what it computed for an earlier one."""

    @property
    def info(self) -> ChatInfo: ...

    def reply(
        self,
        messages: Sequence[ChatMessage],
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> Reply:
        """The next assistant reply to `messages`, older turns dropped to fit the window.
        Raises PromptTooLongError; setting `cancel` stops it as Reply.cancel does."""
        ...

    def complete(
        self,
        prompt: str,
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> Reply:
        """A continuation of raw text, no chat template. Raises PromptTooLongError."""
        ...

    def context_use(self, messages: Sequence[ChatMessage]) -> ContextUse: ...

    def load(self) -> ChatLoad:
        """What it is doing now; cheap, from any thread."""
        ...

    def save_context(self, key: str) -> int | None:
        """The conversation `key` (a conversation's id: letters, digits, _) is being left:
        keep what the chat computed for it, on disk, for restore_context in this process or
        a later one, where that will be faster than computing it again. The tokens kept; None
        when nothing is (saving is off or would not pay, a chat that keeps nothing: remote).
        Waits for a reply being written to end."""
        ...

    def restore_context(self, key: str) -> int:
        """The conversation `key` is being opened: take back what save_context kept for it,
        so that its next reply computes only what follows (and counts it as reused). The
        tokens taken back; 0 when none (then the reply computes everything, as ever). What was
        kept is used only as far as the conversation's prompt still begins with it: never a
        different answer."""
        ...

    def close(self) -> None:
        """Let go of the model (its memory); the chat cannot be used after."""
        ...


class Backend(Protocol):
    def models(self) -> list[ModelInfo]:
        """The models this backend offers, by the names `open_chat` takes."""
        ...

    def open_chat(self, spec: ChatSpec) -> Chat:
        """Load (or reach) spec.model; slow for a local model. Raises ModelUnavailableError."""
        ...
