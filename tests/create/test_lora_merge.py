"""LoRA adapters made with peft (the reference), merged by `llamachat create` into a new
installed model, against peft's own merge_and_unload()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamachat.create.adapter import AdapterError
from llamachat.create.build import create_model
from llamachat.create.chatfile import Recipe
from llamachat.engine import ChatModel, KVCache
from llamachat.models.errors import StoreError
from llamachat.models.pull import pull
from llamachat.models.store import ModelStore

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"mha": dict(num_key_value_heads=8), "gqa": dict(num_key_value_heads=2)}


@pytest.fixture(scope="module")
def store(tiny_model_factory, tmp_path_factory) -> ModelStore:
    """A store with the MHA and GQA tiny models installed as `mha` and `gqa`."""
    root = tmp_path_factory.mktemp("create-store")
    store = ModelStore(root / "models")
    for name, overrides in SHAPES.items():
        pull(str(tiny_model_factory(**overrides)[0]), store, root / "cache", name=name)
    return store


def _reference(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def make_adapter(base_folder: Path, out: Path, seed: int, **lora) -> object:
    """A random (not zero-initialised) peft LoRA of the base, saved to `out`; returns the peft
    model, for merge_and_unload()."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False)
    model = get_peft_model(_reference(base_folder), LoraConfig(**{**options, **lora}))
    model.save_pretrained(out)
    return model


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))


def _engine_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = ChatModel.load(folder, device="cpu")
    model.transformer.setup_rope(64)
    cache = KVCache(model.config, 64, model.device, model.dtype)
    with torch.inference_mode():
        positions = torch.arange(tokens.shape[1])
        return model.transformer(tokens, positions, cache, 64, last_only=False)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_merged_adapter_gives_peft_merge_and_unload_logits(
    store, tiny_model_factory, tmp_path, shape
):
    base = store.get(shape)
    peft_model = make_adapter(base.path, tmp_path / "lora", seed=1)
    expected = _logits(peft_model.merge_and_unload(), _tokens(384))
    created = create_model(
        store, f"{shape}-tuned", Recipe(base=shape, adapters=(tmp_path / "lora",))
    )
    merged = _logits(_reference(created.path), _tokens(384))
    assert (merged - expected).abs().max() <= 1e-5
    # The merge changed the model (a LoRA of zeros would pass the line above too).
    assert (expected - _logits(_reference(base.path), _tokens(384))).abs().max() > 1e-2
    # Our engine on the merged model: as close to peft's as to transformers' (test_equivalence).
    ours = _engine_logits(created.path, _tokens(384))
    assert (ours - expected).abs().max() <= 1e-4
    lineage = created.manifest.lineage
    assert lineage is not None and lineage.base == shape and lineage.merged
    (record,) = lineage.adapters
    assert (record.rank, record.alpha, record.scaling, record.rslora) == (4, 8.0, 2.0, False)


def test_rslora_and_two_stacked_adapters_merge_as_peft_applies_them(store, tmp_path):
    from peft import PeftModel

    base = store.get("gqa")
    make_adapter(base.path, tmp_path / "first", seed=2, use_rslora=True, r=8, lora_alpha=4)
    make_adapter(
        base.path, tmp_path / "second", seed=3, target_modules=["q_proj", "down_proj"], r=2
    )
    reference = PeftModel.from_pretrained(_reference(base.path), tmp_path / "first")
    reference = reference.merge_and_unload()
    reference = PeftModel.from_pretrained(reference, tmp_path / "second").merge_and_unload()
    recipe = Recipe(base="gqa", adapters=(tmp_path / "first", tmp_path / "second"))
    created = create_model(store, "stacked", recipe)
    expected = _logits(reference, _tokens(384))
    assert (_logits(_reference(created.path), _tokens(384)) - expected).abs().max() <= 1e-5
    first, second = created.manifest.lineage.adapters
    assert first.rslora and first.scaling == pytest.approx(4 / 8**0.5)
    assert (second.rank, second.scaling) == (2, 4.0)


def test_rank_and_alpha_patterns_give_modules_their_own_scaling(store, tmp_path):
    base = store.get("gqa")
    peft_model = make_adapter(
        base.path,
        tmp_path / "lora",
        seed=4,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 32},
    )
    expected = _logits(peft_model.merge_and_unload(), _tokens(384))
    created = create_model(store, "patterned", Recipe(base="gqa", adapters=(tmp_path / "lora",)))
    assert (_logits(_reference(created.path), _tokens(384)) - expected).abs().max() <= 1e-5


def test_an_adapter_for_another_hidden_size_is_refused_and_nothing_is_installed(
    store, tiny_model_factory, tmp_path
):
    wider, _ = tiny_model_factory(hidden_size=64, num_key_value_heads=2)
    make_adapter(wider, tmp_path / "lora", seed=5)
    with pytest.raises(AdapterError, match="different shape") as refused:
        create_model(store, "misfit", Recipe(base="gqa", adapters=(tmp_path / "lora",)))
    assert "\n" not in str(refused.value)
    assert "misfit" not in [model.name for model in store.installed()]
    assert not [p for p in (store.root / ".staging").glob("misfit.*") if p.is_dir()]


def test_an_adapter_with_a_rank_other_than_its_config_says_is_refused(store, tmp_path):
    make_adapter(store.get("gqa").path, tmp_path / "lora", seed=6)
    config_path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="rank 4, its config says 16"):
        create_model(store, "wrong-rank", Recipe(base="gqa", adapters=(tmp_path / "lora",)))


def test_an_adapter_that_extends_the_vocabulary_brings_its_tokenizer_and_embeddings(
    store, tmp_path
):
    """As Chinese-LLaMA-Alpaca's merge does: the adapter's tokenizer has more tokens, its
    embed_tokens and lm_head (modules_to_save) are resized, and the new tokens embed as
    peft's merged model embeds them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = store.get("gqa")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenizer.add_tokens(["你好", "世界", "模型"])
    model = _reference(base.path)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(7)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # "trained" rows for the new tokens
        for module in (
            peft_model.base_model.model.model.embed_tokens,
            peft_model.base_model.model.lm_head,
        ):
            module.modules_to_save["default"].weight[-3:].normal_()
    peft_model.save_pretrained(tmp_path / "zh")
    tokenizer.save_pretrained(tmp_path / "zh")
    created = create_model(store, "zh", Recipe(base="gqa", adapters=(tmp_path / "zh",)))
    assert json.loads((created.path / "config.json").read_text())["vocab_size"] == 387
    ids = AutoTokenizer.from_pretrained(created.path)("你好世界模型")["input_ids"]
    assert any(i >= 384 for i in ids)  # the new tokens, from the adapter's tokenizer
    tokens = torch.tensor([ids + [5, 9, 384, 385, 386]])
    expected = _logits(peft_model.merge_and_unload(), tokens)
    assert (_logits(_reference(created.path), tokens) - expected).abs().max() <= 1e-5
    assert (_engine_logits(created.path, tokens) - expected).abs().max() <= 1e-4
    # Applied on loading instead: the base's 384-token embeddings give way to the adapter's.
    from llamachat.create.loading import weights_of

    lazy = create_model(
        store, "zh-lazy", Recipe(base="gqa", adapters=(tmp_path / "zh",)), merge=False
    )
    folder, adjust = weights_of(store, lazy)
    applied = ChatModel.load(lazy.path, device="cpu", weights_folder=folder, adjust=adjust)
    assert (_loaded_logits(applied, tokens) - expected).abs().max() <= 1e-4


def test_resized_embeddings_without_a_tokenizer_are_refused(store, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = _reference(store.get("gqa").path)
    model.resize_token_embeddings(390)
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    get_peft_model(model, config).save_pretrained(tmp_path / "bare")
    with pytest.raises(AdapterError, match="390 tokens but bring no tokenizer"):
        create_model(store, "bare", Recipe(base="gqa", adapters=(tmp_path / "bare",)))


def _loaded_logits(model: ChatModel, tokens: torch.Tensor) -> torch.Tensor:
    model.transformer.setup_rope(64)
    cache = KVCache(model.config, 64, model.device, model.dtype)
    with torch.inference_mode():
        positions = torch.arange(tokens.shape[1])
        return model.transformer(tokens, positions, cache, 64, last_only=False)


def test_adapters_applied_on_loading_give_the_merged_models_logits(store, tmp_path):
    """--no-merge: the created model holds copies of its adapters and no weights; loading it
    reads its base's weights with the adapters applied, as the merge would have written them."""
    from llamachat.create.loading import weights_of

    base = store.get("gqa")
    make_adapter(base.path, tmp_path / "first", seed=8, use_rslora=True)
    make_adapter(base.path, tmp_path / "second", seed=9, target_modules=["o_proj"], r=2)
    recipe = Recipe(base="gqa", adapters=(tmp_path / "first", tmp_path / "second"))
    merged = create_model(store, "both-merged", recipe)
    lazy = create_model(store, "both-lazy", recipe, merge=False)
    assert not list(lazy.path.glob("*.safetensors"))  # the weights stay the base's
    assert lazy.manifest.lineage.merged is False
    folder, adjust = weights_of(store, lazy)
    assert folder == base.path and adjust is not None
    applied = ChatModel.load(lazy.path, device="cpu", weights_folder=folder, adjust=adjust)
    tokens = _tokens(384)
    expected = _loaded_logits(ChatModel.load(merged.path, device="cpu"), tokens)
    assert (_loaded_logits(applied, tokens) - expected).abs().max() <= 1e-5
    assert (
        expected - _loaded_logits(ChatModel.load(base.path, device="cpu"), tokens)
    ).abs().max() > 1e-2
    # The base's weights are shared: the store refuses to remove it while both-lazy needs it.
    assert "both-lazy" in store.needed_by("gqa") and "both-merged" not in store.needed_by("gqa")
    with pytest.raises(StoreError, match="both-lazy.* its weights from gqa"):
        store.remove("gqa")
    assert store.get("gqa").path.is_dir()


def _llama_cpp_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """How llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) orders the rows of
    q and k for its rotary kernel: each head's two halves interleaved."""
    rows = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return rows.swapaxes(1, 2).reshape(weights.shape)


def _gguf_adapter(peft_folder: Path, out: Path, heads: int, kv_heads: int, alpha: float) -> None:
    """A peft adapter as llama.cpp's convert_lora_to_gguf.py writes it: general.type adapter,
    adapter.type lora, adapter.lora.alpha, blk.N.attn_q.weight.lora_a / .lora_b in float32,
    with B of q and k in llama.cpp's row order. Written with gguf-py's own GGUFWriter."""
    import gguf
    from safetensors.torch import load_file

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, tensor in load_file(peft_folder / "adapter_model.safetensors").items():
        layer, part = key.split(".layers.")[1].split(".")[0], key.split(".")[-3]
        side = "lora_a" if ".lora_A." in key else "lora_b"
        if side == "lora_b" and part in ("q_proj", "k_proj"):
            tensor = _llama_cpp_permute(tensor, heads if part == "q_proj" else kv_heads)
        name = f"blk.{layer}.{names[part]}.weight.{side}"
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_llama_cpp_gguf_lora_adapter_merges_as_the_peft_one_it_was_made_from(store, tmp_path):
    base = store.get("gqa")
    peft_model = make_adapter(base.path, tmp_path / "lora", seed=10, r=4, lora_alpha=8)
    _gguf_adapter(tmp_path / "lora", tmp_path / "lora.gguf", heads=8, kv_heads=2, alpha=8)
    created = create_model(
        store, "from-gguf", Recipe(base="gqa", adapters=(tmp_path / "lora.gguf",))
    )
    expected = _logits(peft_model.merge_and_unload(), _tokens(384))
    assert (_logits(_reference(created.path), _tokens(384)) - expected).abs().max() <= 1e-5
    (record,) = created.manifest.lineage.adapters
    assert record.path == str(tmp_path / "lora.gguf") and (record.rank, record.scaling) == (4, 2.0)
    # A GGUF model is not an adapter: refused in one line.
    model_gguf = tmp_path / "model.gguf"
    writer = __import__("gguf").GGUFWriter(model_gguf, "llama")
    writer.add_type("model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        create_model(store, "not-lora", Recipe(base="gqa", adapters=(model_gguf,)))


def test_a_base_pulled_from_a_quantised_gguf_merges_in_the_float32_it_was_converted_to(
    store, tiny_model_factory, tmp_path
):
    from tests.models.tiny_gguf import write_tiny_gguf

    gguf_file = write_tiny_gguf(tiny_model_factory()[0], tmp_path / "tiny.Q8_0.gguf")
    pull(str(gguf_file), store, tmp_path / "cache", name="from-q8")
    base = store.get("from-q8")
    peft_model = make_adapter(base.path, tmp_path / "lora", seed=13)
    created = create_model(store, "q8-tuned", Recipe(base="from-q8", adapters=(tmp_path / "lora",)))
    expected = _logits(peft_model.merge_and_unload(), _tokens(384))
    assert (_logits(_reference(created.path), _tokens(384)) - expected).abs().max() <= 1e-5
    assert created.manifest.weights == "float32 (LoRA merged)"
