"""The KV cache holds kv heads only, sized as the issue states."""

from __future__ import annotations

import os

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


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_cpu_cache_takes_memory_only_for_the_positions_written(tiny_model_factory):
    # A one-shot question uses a few hundred of a model's 8k positions: zeroing the whole
    # cache up front cost SmolLM2 377 MB of memory and 0.1 s of its start.
    folder, _ = tiny_model_factory(
        hidden_size=512, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4,
        max_position_embeddings=16384,
    )  # fmt: skip
    model = ChatModel.load(folder, device="cpu")
    before = _resident_bytes()
    session = model.session(ctx=16384)
    assert session.cache.nbytes >= 256 * 2**20
    assert _resident_bytes() - before < 32 * 2**20
    list(session.reply([{"role": "user", "content": "Hello"}], max_new_tokens=4))
    assert _resident_bytes() - before < 32 * 2**20


def test_a_new_cpu_cache_reads_zeros_where_nothing_was_written(tiny_model):
    # Positions past the valid length are read masked, so they must hold no NaN: a cache made
    # where an earlier one's memory was freed must not see what that one held.
    for _ in range(3):
        session = tiny_model.session(ctx=1024)
        assert not session.cache.k.any() and not session.cache.v.any()
        session.cache.k.fill_(float("nan"))
        session.cache.v.fill_(float("nan"))
        del session
