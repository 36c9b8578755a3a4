"""Turning a LLaMA-architecture GGUF file into a Hugging Face model folder, once, at install.

Quantised tensors are dequantised to float32 with the gguf package (the same routine
transformers' own GGUF loader uses), float tensors are kept in their own precision, and the
query/key rows that llama.cpp interleaves for its rotary kernel are put back in Hugging Face
order. The tokenizer and chat template come from the file's metadata. The result loads as fast
as any safetensors model, and equals, bit for bit in float32, what transformers would build
from the same GGUF.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_stream import TensorEntry, write_safetensors

SHARD_BYTES = 2 * 1024**3  # safetensors files are cut at about this size

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp writes Llama-3.1's rope scaling as a table of per-frequency divisors; these are the
# settings Meta used for Llama-3.1 and 3.2, against which such a table is checked.
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class ConversionError(Exception):
    """The GGUF file is not one this converter can turn into a LLaMA model folder."""


ProgressCallback = Callable[[int, int], None]  # (bytes written so far, bytes in all)


def convert_gguf(gguf_path: Path, out_dir: Path, progress: ProgressCallback | None = None) -> str:
    """Write config.json, generation_config.json, tokenizer files and safetensors weights for
    the model in `gguf_path` into `out_dir` (which must exist). Returns the file's quantisation:
    the type of most of its matrices, such as Q4_1 or F16."""
    with _unreadable(gguf_path):
        reader = _open(gguf_path)
        metadata = _Metadata(reader)
        architecture = metadata.get("general.architecture")
        if architecture != "llama":
            raise ConversionError(
                f"{gguf_path.name} holds a {architecture!r} model; "
                "llamachat converts LLaMA-architecture GGUF files"
            )
        tensors = {tensor.name: tensor for tensor in reader.tensors}
        config = _config(metadata, tensors)
        entries = [
            _entry(tensor, config)
            for name, tensor in tensors.items()
            if name != "rope_freqs.weight"
        ]
        _write_shards(out_dir, entries, progress)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps(_generation_config(metadata), indent=2) + "\n", encoding="utf-8"
    )
    _save_tokenizer(gguf_path, out_dir)
    matrices = Counter(t.tensor_type.name for t in tensors.values() if len(t.shape) == 2)
    return matrices.most_common(1)[0][0] if matrices else "F32"


def _open(path: Path) -> Any:
    """The file's reader, once its signature is checked and its tensors fit in the file."""
    from gguf import GGUFReader

    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    reader = GGUFReader(path)
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ConversionError(
            f"{path} is truncated: {size:,} bytes, its tensors end at {end:,}; download it again"
        )
    return reader


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """A damaged file surfaces as whatever numpy or the gguf reader trip over first (an index
    out of range, a short buffer, a reshape, a bad enum value): one message for all of them."""
    try:
        yield
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error) as error:
        # numpy's own words (a dtype change, an axis) would tell a user nothing; the size may.
        size = path.stat().st_size
        raise ConversionError(
            f"{path} is truncated or corrupt: its GGUF structure cannot be read ({size:,} bytes;"
            f" {type(error).__name__} in reading it); download it again"
        ) from None


class _Metadata:
    def __init__(self, reader: Any):
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConversionError(f"the GGUF metadata lacks {key}")
        return value


def _config(metadata: _Metadata, tensors: dict[str, Any]) -> dict[str, Any]:
    hidden_size = int(metadata.require("llama.embedding_length"))
    n_heads = int(metadata.require("llama.attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length") or hidden_size // n_heads)
    vocab_size = metadata.get("llama.vocab_size") or len(metadata.require("tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": int(metadata.require("llama.feed_forward_length")),
        "num_hidden_layers": int(metadata.require("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv") or n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(metadata.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(metadata, tensors, config)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(
    metadata: _Metadata, tensors: dict[str, Any], config: dict[str, Any]
) -> dict | None:
    kind = metadata.get("llama.rope.scaling.type")
    if kind == "linear":
        return {
            "rope_type": "linear",
            "factor": float(metadata.require("llama.rope.scaling.factor")),
        }
    if kind not in (None, "none"):
        raise ConversionError(f"unsupported rope scaling {kind!r} in the GGUF metadata")
    if "rope_freqs.weight" not in tensors:
        return None
    divisors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    factor = float(divisors.max())
    expected = _llama3_divisors(config["rope_theta"], config["head_dim"], factor, **_LLAMA3_ROPE)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-5):
        raise ConversionError("the GGUF's rope frequency table is not Llama-3 scaling")
    return {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE}


def _llama3_divisors(
    theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """What each rotary frequency is divided by under Llama-3 scaling."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original_max_position_embeddings / high_freq_factor:
            divisors.append(1.0)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            divisors.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors)


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ConversionError(f"unexpected tensor {name!r} in a LLaMA GGUF file")


def _entry(tensor: Any, config: dict[str, Any]) -> TensorEntry:
    from gguf import GGMLQuantizationType as Q

    name = _hf_name(tensor.name)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
    heads = None
    if ".attn_q." in tensor.name:
        heads = config["num_attention_heads"]
    elif ".attn_k." in tensor.name:
        heads = config["num_key_value_heads"]
    dtype = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}.get(tensor.tensor_type, "F32")

    def load() -> np.ndarray:
        if dtype == "F32" and tensor.tensor_type != Q.F32:
            from gguf import dequantize

            data = dequantize(tensor.data, tensor.tensor_type)
        else:
            data = tensor.data  # kept in its own precision; BF16 arrives as raw 16-bit words
        data = data.reshape(shape)
        return _unpermute_rows(data, heads) if heads else data

    return TensorEntry(name, dtype, shape, load)


def _unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows: within each head it interleaves the two rotary
    halves (row pairs 0,hd/2; 1,hd/2+1; ...), where Hugging Face keeps the halves apart."""
    half = weight.shape[0] // n_heads // 2
    rows = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _write_shards(
    out_dir: Path, entries: list[TensorEntry], progress: ProgressCallback | None
) -> None:
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    total = sum(entry.nbytes for entry in entries)
    written = 0

    def advance(entry: TensorEntry) -> None:
        nonlocal written
        written += entry.nbytes
        if progress is not None:
            progress(written, total)

    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], on_tensor=advance)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / filename, shard, on_tensor=advance)
        weight_map.update({entry.name: filename for entry in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )


def _generation_config(metadata: _Metadata) -> dict[str, Any]:
    # End of turn (Llama-3's <|eot_id|>) ends a reply as much as end of text does.
    eos = [metadata.get("tokenizer.ggml.eos_token_id"), metadata.get("tokenizer.ggml.eot_token_id")]
    eos_ids = sorted({int(i) for i in eos if i is not None})
    config: dict[str, Any] = {"bos_token_id": metadata.get("tokenizer.ggml.bos_token_id")}
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return config


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # transformers raises many kinds for a tokenizer it cannot build
        raise ConversionError(f"cannot build a tokenizer from {gguf_path.name}: {error}") from None
    tokenizer.save_pretrained(out_dir)
