"""Choosing the next token: a pure function of (logits, parameters, generator, recent tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transfer import to_device


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn. temperature 0 is greedy (argmax) and ignores the rest.

    The filters run in this order: repetition penalty, temperature, top-k, top-p, min-p.
    top_k 0, top_p 1 and min_p 0 switch their filter off; repeat_penalty 1 or repeat_last_n 0
    switch the penalty off, which otherwise covers the last repeat_last_n tokens of the context.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    # OpenAI's: subtracted from a token's logit per time (frequency) and once (presence) it
    # occurs in the reply so far; 0 switches them off.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be ≥ 0"),
            (self.top_k >= 0, "top_k must be ≥ 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be ≥ 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.seed is None or 0 <= self.seed < 2**64, "seed must be in [0, 2**64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def occurrence_penalised(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0


GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class SampledLogprob:
    """A drawn token's log probability under the model (its raw logits, before any penalty or
    filter, as OpenAI's and vLLM's logprobs are), and the most likely tokens' with theirs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def sampled_logprob(logits: torch.Tensor, token: int, top: int) -> SampledLogprob:
    """For float32 logits (V,) the token was drawn from; `top` alternatives (0 to 20)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    chosen = float(logprobs[token])
    if best is None:
        return SampledLogprob(token, chosen, ())
    pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
    return SampledLogprob(token, chosen, tuple(pairs))


def apply_occurrence_penalties(
    logits: torch.Tensor, produced: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """logits − frequency × (times a token occurs in `produced`) − presence × (whether it does)."""
    counts = torch.bincount(produced, minlength=logits.shape[-1]).to(logits.dtype)
    return _penalise_counts(logits, counts, frequency, presence)


def _penalise_counts(
    logits: torch.Tensor,
    counts: torch.Tensor,
    frequency: float | torch.Tensor,
    presence: float | torch.Tensor,
) -> torch.Tensor:
    """logits − frequency × counts − presence × (counts > 0), per row where given as tensors."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_repeat_penalty(
    logits: torch.Tensor, recent: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """Make recently seen tokens less likely (CTRL's penalty): positive logits are divided by the
    penalty and negative ones multiplied, so the push is always towards less probable. Rows of
    logits (B, V) take recent (B, W) and a penalty per row (B, 1)."""
    if (not isinstance(penalty, torch.Tensor) and penalty == 1.0) or recent.numel() == 0:
        return logits
    seen = logits.gather(-1, recent)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, recent, seen)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    recent: torch.Tensor | None = None,
    produced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token id from float32 logits (V,); returns a 0-d long tensor on their device.
    `recent`: the context's last tokens (the repetition penalty); `produced`: the reply's tokens
    so far (the frequency and presence penalties)."""
    if recent is not None and params.repeat_penalty != 1.0 and params.repeat_last_n > 0:
        logits = apply_repeat_penalty(
            logits, recent[-params.repeat_last_n :], params.repeat_penalty
        )
    if produced is not None and produced.numel() and params.occurrence_penalised:
        logits = apply_occurrence_penalties(
            logits, produced, params.frequency_penalty, params.presence_penalty
        )
    if params.greedy:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it
        # is still short of top_p, so the most likely token always stays.
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return torch.multinomial(probs, 1, generator=generator)[0]


def greedy_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    contexts: list[list[int]],
    reply_starts: list[int],
) -> torch.Tensor:
    """The greedy choice (B,) for each row of float32 logits (B, V) under its own penalties:
    what `sample` gives each row alone (temperature 0), in a few operations for the whole batch
    rather than a few per row. `contexts`: each row's tokens, prompt and reply so far (its
    last repeat_last_n for the repetition penalty); `reply_starts`: where its reply begins
    (the frequency and presence penalties count the tokens from there)."""
    device = logits.device
    windows = [
        row[-p.repeat_last_n :] if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 else []
        for p, row in zip(params, contexts, strict=True)
    ]
    if any(windows):
        # Rows are padded with their own first token (or token 0 under a penalty of 1): the
        # gather and scatter penalise a token seen twice once.
        width = max(len(w) for w in windows)
        padded = [w + w[:1] * (width - len(w)) if w else [0] * width for w in windows]
        index = to_device(padded, device)
        penalty = [p.repeat_penalty if w else 1.0 for p, w in zip(params, windows, strict=True)]
        logits = apply_repeat_penalty(logits, index, to_device(penalty, device)[:, None])
    replies = [
        row[start:] if p.occurrence_penalised else []
        for p, row, start in zip(params, contexts, reply_starts, strict=True)
    ]
    if any(replies):
        width = max(len(r) for r in replies)
        index = to_device([r + [0] * (width - len(r)) for r in replies], device)
        valid = [[1.0] * len(r) + [0.0] * (width - len(r)) for r in replies]
        counts = torch.zeros_like(logits).scatter_add_(
            -1, index, to_device(valid, device, logits.dtype)
        )
        frequency = to_device([p.frequency_penalty for p in params], device)[:, None]
        presence = to_device([p.presence_penalty for p in params], device)[:, None]
        logits = _penalise_counts(logits, counts, frequency, presence)
    return logits.argmax(-1)
