"""The KV cache holds kv heads only, sized as the issue states."""

from __future__ import annotations

import torch

from llamachat.engine import ChatModel


def test_cache_shape_is_kv_heads_only(tiny_model_factory):
    folder, _ = tiny_model_factory(num_key_value_heads=1)
    model = ChatModel.load(folder, device="cpu")
    session = model.session(ctx=256)
    config = model.config
    expected_shape = (config.n_layers, 1, 256, config.head_dim)
    assert session.cache.k.shape == session.cache.v.shape == expected_shape


def test_bytes_per_token_and_total(tiny_model):
    config = tiny_model.config
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4
    assert tiny_model.kv_bytes_per_token == per_token
    session = tiny_model.session(ctx=512)
    assert session.cache.bytes_per_token == per_token
    assert session.cache.nbytes == tiny_model.kv_bytes(512) == 512 * per_token


def test_bf16_cache_halves_the_bytes(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder, device="cpu", dtype="bfloat16")
    assert model.session(ctx=64).cache.k.dtype == torch.bfloat16
    assert model.kv_bytes_per_token * 2 == ChatModel.load(folder, device="cpu").kv_bytes_per_token


def test_cache_holds_what_the_session_says(tiny_model):
    session = tiny_model.session(ctx=128)
    reply = session.reply([{"role": "user", "content": "Hello"}], max_new_tokens=4)
    list(reply)
    filled = len(session.cached_ids)
    assert filled == reply.stats.prompt_tokens + len(reply.token_ids) - (
        1 if reply.stats.finish_reason != "stop" else 0
    )
    assert session.cache.k[:, :, :filled].abs().sum() > 0
    assert session.cache.k[:, :, filled:].abs().sum() == 0
