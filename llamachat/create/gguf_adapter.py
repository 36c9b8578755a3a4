"""A llama.cpp LoRA adapter (a GGUF file of general.type `adapter`, adapter.type `lora`) turned
into the PEFT form the merge reads (adapter.py), in a folder of the caller's.

llama.cpp names each pair after the tensor it changes (`blk.0.attn_q.weight.lora_a`, `.lora_b`),
with A as rank × in and B as out × rank as PEFT has them, one alpha for the whole file
(`adapter.lora.alpha`; 0 means a scaling of 1) and each tensor's own rank. Its query and key
rows are interleaved for llama.cpp's rotary kernel, in B: they are put back in Hugging Face
order, as a GGUF model's weights are (models/gguf.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..models.gguf import ConversionError, _hf_name, _Metadata, _open, _unpermute_rows, _unreadable
from ..models.manifest import sha256_of
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, LoraAdapter

_SUFFIXES = (".lora_a", ".lora_b")


def read_gguf_adapter(path: Path, base_config: dict[str, Any], folder: Path) -> LoraAdapter:
    """The adapter in the GGUF file `path`, written as a PEFT adapter into `folder` (empty) for a
    base of `base_config`. Raises AdapterError."""
    try:
        with _unreadable(path):
            reader = _open(path)
            metadata = _Metadata(reader)
            _check_kind(path, metadata)
            tensors = {_pair_name(path, t.name): t for t in reader.tensors}
            alpha = float(metadata.get("adapter.lora.alpha", 0.0) or 0.0)
            state, ranks = _peft_tensors(path, tensors, base_config)
    except ConversionError as error:
        raise AdapterError(str(error)) from None
    if not state:
        raise AdapterError(f"adapter {path}: the GGUF file holds no LoRA tensors")
    rank = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha or rank,
        # llama.cpp scales each tensor by alpha / its own rank, and by 1 when alpha is 0.
        "rank_pattern": {module: r for module, r in ranks.items() if r != rank},
        "alpha_pattern": {} if alpha else {module: r for module, r in ranks.items()},
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(state, folder / ADAPTER_WEIGHTS)
    adapter = LoraAdapter.read(folder)
    return dataclasses.replace(adapter, source=path, sha256=sha256_of(path))


def _check_kind(path: Path, metadata: _Metadata) -> None:
    kind, adapter_kind = metadata.get("general.type"), metadata.get("adapter.type")
    if kind != "adapter" or adapter_kind != "lora":
        raise AdapterError(f"adapter {path}: a GGUF file, but not a LoRA adapter (a model?)")
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise AdapterError(f"adapter {path}: an adapter for {architecture}, not for LLaMA")


def _pair_name(path: Path, name: str) -> str:
    if not name.endswith(_SUFFIXES):
        raise AdapterError(f"adapter {path}: unexpected tensor {name!r} (only LoRA pairs merge)")
    if name.startswith("token_embd."):
        raise AdapterError(f"adapter {path}: LoRA on the token embeddings is not supported")
    return name


def _peft_tensors(
    path: Path, tensors: dict[str, Any], base_config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, tensor in tensors.items():
        target, side = name[: -len(".lora_a")], name[-1].upper()
        try:
            module = _hf_name(target).removesuffix(".weight")
        except ConversionError:
            raise AdapterError(f"adapter {path}: unexpected tensor {name!r}") from None
        data = _array(tensor)
        if side == "B":
            heads = _heads(target, base_config)
            data = _unpermute_rows(data, heads) if heads else data
        else:
            ranks[module] = data.shape[0]
        state[f"base_model.model.{module}.lora_{side}.weight"] = _torch(data, tensor)
    return state, ranks


def _heads(target: str, config: dict[str, Any]) -> int | None:
    if ".attn_q." in target:
        return int(config["num_attention_heads"])
    if ".attn_k." in target:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _array(tensor: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
    if tensor.tensor_type in (Q.F32, Q.F16, Q.BF16):
        return np.asarray(tensor.data).reshape(shape)
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def _torch(data: np.ndarray, tensor: Any) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q

    if tensor.tensor_type == Q.BF16:  # raw 16-bit words
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy()).view(
            torch.bfloat16
        )
    return torch.from_numpy(np.ascontiguousarray(data, dtype=data.dtype).copy())
