"""Our Transformer against transformers' LlamaForCausalLM on tiny random models, fp32."""

from __future__ import annotations

import pytest
import torch

from llamachat.engine import ChatModel, KVCache
from llamachat.engine.session import ATTEND_BUCKET

TOLERANCE = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the tiny model's frequencies fall in all three bands of the scheme.
    "original_max_position_embeddings": 64,
}

CONFIGS = {
    "mha": dict(num_key_value_heads=8),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "llama3-rope": dict(rope_scaling=LLAMA3_ROPE),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "explicit-head-dim": dict(head_dim=32),
}


def _reference_logits(reference, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(tokens).logits


def _cache(model: ChatModel, length: int) -> KVCache:
    model.transformer.setup_rope(length)
    return KVCache(model.config, length, model.device, model.dtype)


def _attend_len(end: int, capacity: int) -> int:
    return min(capacity, -(-end // ATTEND_BUCKET) * ATTEND_BUCKET)


def _load(factory, architecture="llama", **overrides):
    folder, reference = factory(architecture=architecture, **overrides)
    return ChatModel.load(folder, device="cpu"), reference


@pytest.mark.parametrize("name", CONFIGS)
def test_full_forward_matches_transformers(tiny_model_factory, name):
    model, reference = _load(tiny_model_factory, **CONFIGS[name])
    tokens = torch.randint(
        0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1)
    )
    cache = _cache(model, 512)
    with torch.inference_mode():
        ours = model.transformer(
            tokens, torch.arange(300), cache, _attend_len(300, 512), last_only=False
        )
    expected = _reference_logits(reference, tokens)
    assert (ours - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_matches_transformers(tiny_model_factory, name):
    """Token by token through the KV cache, across an attention-bucket boundary."""
    model, reference = _load(tiny_model_factory, **CONFIGS[name])
    length = ATTEND_BUCKET + 20
    tokens = torch.randint(
        0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(2)
    )
    cache = _cache(model, 512)
    steps = []
    with torch.inference_mode():
        for position in range(length):
            step = model.transformer(
                tokens[:, position : position + 1],
                torch.tensor([position]),
                cache,
                _attend_len(position + 1, 512),
            )
            steps.append(step)
    ours = torch.cat(steps, dim=1)
    expected = _reference_logits(reference, tokens)
    assert (ours - expected).abs().max().item() < TOLERANCE


def test_chunked_prefill_then_decode_matches_transformers(tiny_model_factory):
    model, reference = _load(tiny_model_factory)
    tokens = torch.randint(
        0, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(3)
    )
    cache = _cache(model, 512)
    with torch.inference_mode():
        first = model.transformer(
            tokens[:, :60], torch.arange(60), cache, _attend_len(60, 512), last_only=False
        )
        second = model.transformer(
            tokens[:, 60:], torch.arange(60, 100), cache, _attend_len(100, 512), last_only=False
        )
    ours = torch.cat([first, second], dim=1)
    assert (ours - _reference_logits(reference, tokens)).abs().max().item() < TOLERANCE


def test_mistral_config_without_sliding_window_matches_transformers(tiny_model_factory):
    model, reference = _load(tiny_model_factory, architecture="mistral", sliding_window=None)
    tokens = torch.randint(
        0, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(4)
    )
    cache = _cache(model, 256)
    with torch.inference_mode():
        ours = model.transformer(tokens, torch.arange(50), cache, 256, last_only=False)
    assert (ours - _reference_logits(reference, tokens)).abs().max().item() < TOLERANCE


def test_rope_scaling_changes_the_logits(tiny_model_factory):
    """Guards the rope tests above: the same weights without the scaling must differ."""
    scaled, _ = _load(tiny_model_factory, rope_scaling=LLAMA3_ROPE)
    plain, _ = _load(tiny_model_factory)
    tokens = torch.randint(0, 384, (1, 100), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a = scaled.transformer(tokens, torch.arange(100), _cache(scaled, 256), 256, last_only=False)
        b = plain.transformer(tokens, torch.arange(100), _cache(plain, 256), 256, last_only=False)
    assert (a - b).abs().max().item() > 100 * TOLERANCE
