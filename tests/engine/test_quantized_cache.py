"""Quantised layers kept between loads (quantized_cache.py): a load that finds them computes
what a load that quantises computes, bit for bit; a file that is damaged, stale or not ours is
never trusted."""

from __future__ import annotations

import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamachat.engine import ChatModel, KVCache
from llamachat.engine.quantized_cache import cache_file

TOKENS = torch.randint(0, 384, (1, 24), generator=torch.Generator().manual_seed(5))


def logits(model: ChatModel) -> torch.Tensor:
    """Every position's logits for TOKENS, read as one prompt into a cache of its own."""
    model.transformer.setup_rope(32)
    cache = KVCache(model.config, 32, model.device, model.dtype)
    count = TOKENS.shape[1]
    with torch.inference_mode():
        return model.transformer(TOKENS, torch.arange(count), cache, 32, last_only=False)


@pytest.fixture
def tiny_copy(tiny_model_factory, tmp_path):
    """A folder of its own holding the GQA tiny model, its checkpoint free to be rewritten."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory(intermediate_size=384)[0], folder)
    return folder


def kept_files(folder):
    return sorted((folder / "quantized").glob("*.safetensors"))


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_a_second_load_reads_the_kept_layers_and_computes_the_same(tiny_copy, quantization):
    cache = tiny_copy / "quantized"
    fresh = logits(ChatModel.load(tiny_copy, device="cpu", quantization=quantization))
    first = ChatModel.load(
        tiny_copy, device="cpu", quantization=quantization, quantized_cache=cache
    )
    (kept,) = kept_files(tiny_copy)
    assert kept.name.startswith(f"{quantization}-cpu-")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    second = ChatModel.load(
        tiny_copy, device="cpu", quantization=quantization, quantized_cache=cache
    )
    assert torch.equal(logits(first), fresh)
    assert torch.equal(logits(second), fresh)
    # Its tensors are what it computes with: the second load took them from the file.
    tensors = load_file(kept)
    name = "layers.0.feed_forward.w2.weight"
    assert torch.equal(tensors[name], second.transformer.layers[0].feed_forward.w2.weight)


def test_the_kept_file_is_what_the_next_load_computes_with(tiny_copy):
    """Proof that a load reads the file rather than quantising again: a file whose head was
    altered (kept with its own digest's name) changes the logits that load gives."""
    cache = tiny_copy / "quantized"
    ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    (kept,) = kept_files(tiny_copy)
    tensors = {name: t.clone() for name, t in load_file(kept).items()}  # not views of the file
    tensors["output.scale"] = tensors["output.scale"] * 2
    metadata = _metadata(kept)
    save_file(tensors, kept, metadata)
    altered = ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    fresh = ChatModel.load(tiny_copy, device="cpu", quantization="int4")
    assert torch.allclose(logits(altered), 2 * logits(fresh), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other layers"])
def test_a_damaged_file_is_ignored_and_written_anew(tiny_copy, damage):
    cache = tiny_copy / "quantized"
    fresh = logits(ChatModel.load(tiny_copy, device="cpu", quantization="int4"))
    ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    (kept,) = kept_files(tiny_copy)
    whole = kept.read_bytes()
    tensors = {name: t.clone() for name, t in load_file(kept).items()}  # not views of the file
    if damage == "truncated":
        kept.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        kept.write_bytes(b"\xff" * 64)
    else:  # a valid file whose layers are not this model's shapes
        cut = dict(tensors)
        cut["layers.0.attention.wo.weight"] = cut["layers.0.attention.wo.weight"][:8]
        save_file(cut, kept, _metadata(kept))
    model = ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    assert torch.equal(logits(model), fresh)
    rewritten = load_file(kept)
    assert rewritten.keys() == tensors.keys()
    assert all(torch.equal(rewritten[name], tensors[name]) for name in tensors)


def test_a_rewritten_checkpoint_is_quantised_again_and_its_old_layers_removed(
    tiny_copy, tiny_model_factory
):
    cache = tiny_copy / "quantized"
    ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    (old,) = kept_files(tiny_copy)
    other, _ = tiny_model_factory(seed=1, intermediate_size=384)
    shutil.copy(other / "model.safetensors", tiny_copy / "model.safetensors")
    model = ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    (new,) = kept_files(tiny_copy)
    assert new != old
    expected = ChatModel.load(other, device="cpu", quantization="int4")
    assert torch.equal(logits(model), logits(expected))


def test_the_kept_layers_name_the_cpus_layout(tiny_copy, monkeypatch):
    """Without the C kernels int4 takes PyTorch's packing: another file, never the other's."""
    files = [tiny_copy / "model.safetensors"]
    cache = tiny_copy / "quantized"
    native = cache_file(cache, files, "int4", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("LLAMACHAT_NATIVE", "0")
    packed = cache_file(cache, files, "int4", torch.device("cpu"), torch.float32)
    assert native != packed
    fresh = logits(ChatModel.load(tiny_copy, device="cpu", quantization="int4"))
    ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    model = ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=cache)
    assert kept_files(tiny_copy) == [packed]
    assert torch.equal(logits(model), fresh)


def test_nothing_is_kept_for_f16_or_for_adapters_applied_on_loading(tiny_copy):
    cache = tiny_copy / "quantized"
    ChatModel.load(tiny_copy, device="cpu", quantization="f16", quantized_cache=cache)
    ChatModel.load(
        tiny_copy,
        device="cpu",
        quantization="int4",
        quantized_cache=cache,
        adjust=lambda name, tensor: tensor * 1.5,
    )
    assert kept_files(tiny_copy) == []


def test_a_folder_it_cannot_write_only_means_quantising_again(tiny_copy):
    blocked = tiny_copy / "quantized"
    blocked.write_text("a file where the folder would go")
    fresh = logits(ChatModel.load(tiny_copy, device="cpu", quantization="int4"))
    model = ChatModel.load(tiny_copy, device="cpu", quantization="int4", quantized_cache=blocked)
    assert torch.equal(logits(model), fresh)


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as file:
        return file.metadata()
