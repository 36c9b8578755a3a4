"""The engine on a CUDA GPU. CI has none, so these run on a GPU machine only."""

from __future__ import annotations

import pytest
import torch

from llamachat.engine import GREEDY, ChatModel, KVCache, SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def logits(model: ChatModel, tokens: torch.Tensor) -> torch.Tensor:
    model.transformer.setup_rope(256)
    cache = KVCache(model.config, 256, model.device, model.dtype)
    with torch.inference_mode():
        return model.transformer(
            tokens.to(model.device),
            torch.arange(tokens.shape[1], device=model.device),
            cache,
            256,
            last_only=False,
        ).cpu()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_are_close_to_the_fp32_cpu_reference(tiny_model_factory, dtype):
    folder, _ = tiny_model_factory()
    tokens = torch.randint(0, 384, (1, 200), generator=torch.Generator().manual_seed(0))
    reference = logits(ChatModel.load(folder, device="cpu"), tokens)
    half = logits(ChatModel.load(folder, device="cuda", dtype=dtype), tokens)
    relative = (half - reference).norm() / reference.norm()
    assert relative < 2e-2


def test_auto_picks_the_gpu_in_bf16(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder)
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    assert model.session(ctx=64).cache.k.device.type == "cuda"


def test_prefix_reuse_on_the_gpu_matches_a_fresh_session(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder, device="cuda", dtype="float32")
    session = model.session()
    first = [{"role": "user", "content": "Hello"}]
    reply = session.reply(first, GREEDY, max_new_tokens=12)
    list(reply)
    second = [
        *first,
        {"role": "assistant", "content": reply.text},
        {"role": "user", "content": "Go on"},
    ]
    again = session.reply(second, GREEDY, max_new_tokens=12)
    list(again)
    fresh = model.session().reply(second, GREEDY, max_new_tokens=12)
    list(fresh)
    assert again.stats.reused_tokens > 0
    assert again.token_ids == fresh.token_ids


def test_seeded_sampling_repeats_on_the_gpu(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder, device="cuda")
    params = SamplingParams(temperature=1.0, seed=11)

    def sampled():
        reply = model.session(ctx=128).reply([{"role": "user", "content": "Hi"}], params, 16)
        list(reply)
        return reply.token_ids

    assert sampled() == sampled()
