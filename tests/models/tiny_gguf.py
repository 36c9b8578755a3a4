"""A tiny LLaMA GGUF file written with the gguf package from a tiny Hugging Face model folder
(tests/tiny.py): its metadata, byte-level BPE tokenizer and weights, matrices in Q8_0, for
tests that need a real GGUF file of a few hundred kilobytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_tiny_gguf(model_folder: Path, path: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_folder / "config.json").read_text())
    tokenizer = json.loads((model_folder / "tokenizer.json").read_text())
    weights = load_file(model_folder / "model.safetensors")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_tokenizer_model("gpt2")
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    added = {token["content"] for token in tokenizer["added_tokens"]}
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in added else 1 for token, _ in vocab])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, tensor in weights.items():
        gguf_name, part = _gguf_name(name)
        if part in heads:
            tensor = _llama_cpp_order(tensor, heads[part])
        if tensor.ndim == 2:
            quantized = gguf.quantize(tensor.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                gguf_name, quantized, raw_shape=quantized.shape,
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )  # fmt: skip
        else:
            writer.add_tensor(gguf_name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(name: str) -> tuple[str, str]:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in top:
        return top[name], ""
    _, _, layer, rest = name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_PARTS[part]}.{kind}", part.split(".")[-1]


def _llama_cpp_order(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: the two rotary halves of each head interleaved."""
    head_dim = weight.shape[0] // n_heads
    rows = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)
