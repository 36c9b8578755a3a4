"""A chat session: one KV cache, reused across the turns of a conversation.

Each request carries the whole conversation. The session remembers which token ids its cache
holds, and prefills only what follows the longest common prefix with the new prompt: a new turn
costs its own tokens, and a regenerated or edited turn rolls the cache back to where the
conversations part.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .chat_format import ChatMessage
from .cuda_graphs import GraphedDecoder
from .detokenize import StreamDecoder
from .kv_cache import KVCache
from .model import SPLIT
from .prompts import Prompt, PromptFitter
from .sampling import GREEDY, SampledLogprob, SamplingParams, sample, sampled_logprob

if TYPE_CHECKING:
    from .chat_model import ChatModel  # which imports this module to open sessions

FinishReason = Literal["stop", "length", "context", "cancelled"]

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory on long prompts
# Attention reads the cache in steps of this many positions, not all of it; a multiple of the
# slice the decode attention splits its sum into.
ATTEND_BUCKET = SPLIT
# A prefill of at least this many tokens measures the session's prefill rate (a shorter one is
# mostly the fixed cost of a forward pass and the first sample).
RATE_MIN_TOKENS = 64


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens found in the cache, not computed again
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0  # from the request to the first sampled token
    decode_s: float = 0.0  # from the first sampled token to the last
    finish_reason: FinishReason | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class ChatSession:
    def __init__(self, model: ChatModel, ctx: int, cuda_graphs: bool | None = None):
        self.model = model
        self.ctx = ctx
        # Room for whole attention buckets: every attention length is then a multiple of
        # ATTEND_BUCKET, which the decode attention splits its sum by.
        capacity = _whole_buckets(ctx)
        if model.transformer.rope_len < capacity:
            model.transformer.setup_rope(capacity)
        # The transformer's own shape: under tensor parallelism, this rank's kv heads only.
        self.cache = KVCache(model.transformer.config, capacity, model.device, model.dtype)
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds
        # Prompt tokens per second of the latest prefill of RATE_MIN_TOKENS or more, to the
        # first sampled token; None until one ran. Whether saving the cache pays goes by it.
        self.prefill_rate: float | None = None
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda"
        # A graph's replay would run rank 0's kernels without telling the other ranks to.
        cuda_graphs = cuda_graphs and model.transformer.leader is None
        self.decoder = GraphedDecoder(model.transformer, self.cache) if cuda_graphs else None

    def reset(self) -> None:
        self.cached_ids = []

    def reply(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams = GREEDY,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
        cancel: threading.Event | None = None,
        top_logprobs: int | None = None,
        continue_reply: bool = False,
    ) -> Reply:
        """Prepare the assistant's next reply to `messages`; iterate the Reply to stream it.
        With `continue_reply` the last message, an assistant's, is left open and the reply
        goes on from its text.

        Raises ContextOverflowError when the system prompt and the last message alone do not
        fit the context; older turns are dropped silently otherwise (see Reply.dropped).
        """
        stops = tuple(stop) + self.model.chat_format.stop

        def fitted() -> Prompt:
            return self.fit(messages, max_new_tokens, continue_reply)

        return self._prepared(fitted, sampling, stops, cancel, top_logprobs)

    def complete(
        self,
        text: str,
        sampling: SamplingParams = GREEDY,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
        cancel: threading.Event | None = None,
        top_logprobs: int | None = None,
    ) -> Reply:
        """Continue raw `text`, no chat template (what /v1/completions asks for). Raises
        ContextOverflowError when the text alone fills the context."""
        fitter = PromptFitter(self.model, self.ctx)
        return self._prepared(
            lambda: fitter.raw(text, max_new_tokens), sampling, tuple(stop), cancel, top_logprobs
        )

    def _prepared(
        self,
        make_prompt: Callable[[], Prompt],
        sampling: SamplingParams,
        stop: tuple[str, ...],
        cancel: threading.Event | None,
        top_logprobs: int | None,
    ) -> Reply:
        """A Reply to the prompt `make_prompt` builds; its time to first token counts from
        here, the templating included."""
        started = time.perf_counter()
        self.model.retune_threads()
        prompt = make_prompt()
        return Reply(
            self, prompt, sampling, stop, cancel or threading.Event(), started, top_logprobs
        )

    def fit(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int | None = None,
        continue_reply: bool = False,
    ) -> Prompt:
        """Template the conversation, dropping the oldest exchanges (never the system prompt)
        until it and the room for the reply fit the context."""
        return PromptFitter(self.model, self.ctx).fit(messages, max_new_tokens, continue_reply)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        cancel: threading.Event,
        stats: GenerationStats,
        logprobs: tuple[list[SampledLogprob], int] | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids until an end-of-sequence id, max_new_tokens, or cancel.

        The end-of-sequence id is yielded too, so the caller can tell it apart; the cache keeps
        every token fed through the model, and survives a stop or an exception half-way.
        `logprobs`: a list that gets each token's SampledLogprob (but the end-of-sequence id's),
        with that many alternatives.
        """
        # At least the last prompt token is computed again: its logits start the reply.
        reuse = min(_common_prefix(self.cached_ids, prompt_ids), len(prompt_ids) - 1)
        del self.cached_ids[reuse:]
        stats.prompt_tokens = len(prompt_ids)
        stats.reused_tokens = reuse
        stats.prefilled_tokens = len(prompt_ids) - reuse
        prefill_started = time.perf_counter()
        logits = None
        for start in range(reuse, len(prompt_ids), PREFILL_CHUNK):
            if cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            logits = self._forward(prompt_ids[start : start + PREFILL_CHUNK])
        assert logits is not None
        generator = torch.Generator(self.model.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else _random_seed())
        context = list(prompt_ids)
        for count in range(1, max_new_tokens + 1):
            recent = None
            if sampling.repeat_penalty != 1.0:
                recent = torch.tensor(context[-sampling.repeat_last_n :], device=self.model.device)
            produced = None
            if sampling.occurrence_penalised:
                produced = torch.tensor(context[len(prompt_ids) :], device=self.model.device)
            token = int(sample(logits[0, -1], sampling, generator, recent, produced))
            if count == 1 and stats.prefilled_tokens >= RATE_MIN_TOKENS:  # int() waited for it
                elapsed = time.perf_counter() - prefill_started
                self.prefill_rate = stats.prefilled_tokens / max(elapsed, 1e-6)
            if logprobs is not None and token not in self.model.eos_token_ids:
                kept, top = logprobs
                kept.append(sampled_logprob(logits[0, -1], token, top))
            if token in self.model.eos_token_ids:
                stats.finish_reason = "stop"
            elif count == max_new_tokens:
                stats.finish_reason = "length"
            yield token
            if stats.finish_reason is not None:
                return
            if cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            context.append(token)
            logits = self._forward([token])

    def _forward(self, token_ids: list[int]) -> torch.Tensor:
        """Run tokens that follow the cached ones; returns the last token's logits (1, 1, V)."""
        start = len(self.cached_ids)
        end = start + len(token_ids)
        if self.decoder is not None and len(token_ids) == 1:
            logits = self.decoder.step(token_ids[0], start)
            self.cached_ids.append(token_ids[0])
            return logits
        device = self.model.device
        tokens = torch.tensor([token_ids], device=device)
        positions = torch.arange(start, end, device=device)
        attend_len = min(self.cache.max_len, _whole_buckets(end))
        logits = self.model.transformer(tokens, positions, self.cache, attend_len)
        self.cached_ids.extend(token_ids)
        return logits


class Reply:
    """One assistant reply. Iterate it for text pieces as they are generated; afterwards (or
    after a stop, cancel or break) `text`, `token_ids` and `stats` hold what was produced."""

    def __init__(
        self,
        session: ChatSession,
        prompt: Prompt,
        sampling: SamplingParams,
        stop: tuple[str, ...],
        cancel: threading.Event,
        started: float,
        top_logprobs: int | None = None,
    ):
        self.session = session
        self.prompt = prompt
        self.sampling = sampling
        self.cancel = cancel
        self.token_ids: list[int] = []
        self.stats = GenerationStats()
        # With top_logprobs (0 to 20 alternatives): each token's SampledLogprob, as it comes.
        self.top_logprobs = top_logprobs
        self.logprobs: list[SampledLogprob] = []
        self._decoder = StreamDecoder(session.model.decode, stop)
        self._started = started
        self._consumed = False

    @property
    def dropped(self) -> tuple[int, ...]:
        """Indices of the messages that were left out to fit the context window."""
        return self.prompt.dropped

    @property
    def text(self) -> str:
        return self._decoder.text

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise RuntimeError("a Reply can be streamed only once")
        self._consumed = True
        stats, eos = self.stats, self.session.model.eos_token_ids
        first_token_at = None
        wanted = None if self.top_logprobs is None else (self.logprobs, self.top_logprobs)
        tokens = self.session.generate(
            self.prompt.token_ids,
            self.sampling,
            self.prompt.max_new_tokens,
            self.cancel,
            stats,
            wanted,
        )
        try:
            for token in tokens:
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                    stats.time_to_first_token_s = now - self._started
                stats.decode_s = now - first_token_at
                stats.generated_tokens += 1
                if token in eos:
                    break
                self.token_ids.append(token)
                piece = self._decoder.push(token)
                if piece:
                    yield piece
                if self._decoder.stopped:
                    stats.finish_reason = "stop"
                    return
            piece = self._decoder.finish()
            if piece:
                yield piece
        finally:
            tokens.close()
        window_full = len(self.prompt.token_ids) + stats.generated_tokens >= self.session.ctx
        if stats.finish_reason == "length" and window_full:
            stats.finish_reason = "context"


def _whole_buckets(length: int) -> int:
    """`length` rounded up to a multiple of ATTEND_BUCKET."""
    return -(-length // ATTEND_BUCKET) * ATTEND_BUCKET


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = min(len(a), len(b))
    start = 0
    # Whole slices first (compared in C), then the one where they part, token by token: a
    # batch scheduler compares each new prompt with every slot's contents.
    while (
        start + _COMPARED <= length and a[start : start + _COMPARED] == b[start : start + _COMPARED]
    ):
        start += _COMPARED
    for index in range(start, length):
        if a[index] != b[index]:
            return index
    return length


_COMPARED = 64


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
