"""Weights from safetensors onto the target device, in the target dtype, with no pickle and no
full-precision copy: the model is built on the meta device and the checkpoint's tensors are
assigned into it as they are read."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import DeviceError, ModelLoadError
from .model import Transformer
from .quantize import head_quantization, quantizable, quantize_linear
from .quantized_cache import cache_file, read_layers, write_layers
from .shards import Shard
from .weights_reader import read_tensors

DTYPE_BY_NAME = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Checkpoint names (Hugging Face layout) → our parameter, the slot the tensor takes in it and how
# many slots it has: q, k and v are stacked into one matrix, and so are gate and up.
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_PARTS: dict[str, tuple[str, int, int]] = {
    "self_attn.q_proj": ("attention.wqkv", 0, 3),
    "self_attn.k_proj": ("attention.wqkv", 1, 3),
    "self_attn.v_proj": ("attention.wqkv", 2, 3),
    "self_attn.o_proj": ("attention.wo", 0, 1),
    "mlp.gate_proj": ("feed_forward.w13", 0, 2),
    "mlp.up_proj": ("feed_forward.w13", 1, 2),
    "mlp.down_proj": ("feed_forward.w2", 0, 1),
    "input_layernorm": ("attention_norm", 0, 1),
    "post_attention_layernorm": ("ffn_norm", 0, 1),
}
_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
AdjustWeight = Callable[[str, torch.Tensor], torch.Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "CUDA was asked for but this torch build sees no CUDA GPU; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"no GPU {device.index}: this machine has {torch.cuda.device_count()}"
            )
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (fp16 on older ones), fp32 on the CPU, unless asked otherwise."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPE_BY_NAME.get(name)
    if dtype is None:
        raise DeviceError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    if dtype is torch.float16 and device.type == "cpu":
        raise DeviceError("float16 is not supported on the CPU: use bfloat16 or float32")
    return dtype


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read {index}: {error}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{folder} is missing weight shards: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
        raise ModelLoadError(
            f"{folder} has only pickle weights (.bin/.pth); llamachat loads safetensors only"
        )
    raise ModelLoadError(f"{folder} has no .safetensors weights")


def load_transformer(
    folder: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
    adjust: AdjustWeight | None = None,
    cache_folder: Path | None = None,
    shard: Shard | None = None,
) -> Transformer:
    """Build the model on the meta device and assign the checkpoint's tensors into it. With a
    quantisation, each projection is quantised as soon as its tensors are read, so the
    full-precision copy of the whole model never exists (a 70B model loads as int4 on one GPU).
    `adjust(name, tensor)` gives each checkpoint tensor, by its checkpoint name, the value to
    use instead (LoRA adapters applied on loading), before any is stacked or quantised.
    `cache_folder`: where quantised layers are kept between loads (quantized_cache.py), read
    instead of the checkpoint's projections when they are there, written when not.
    `shard`: keep only a tensor-parallel rank's part of each tensor (shards.py), in a
    model of that part's shape."""
    model = Transformer(config if shard is None else shard.local_config(), device="meta")
    expected = model.state_dict()
    parts: dict[str, dict[int, torch.Tensor]] = {}
    slots: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    files = weight_files(folder)
    kept = None
    # On a GPU quantising takes less time than reading the weights does: nothing is kept there
    # (a 70B model's int4 layers would be 35 GB more on disk for a little time).
    if (
        quantization
        and cache_folder is not None
        and adjust is None
        and shard is None
        and device.type == "cpu"
    ):
        kept = cache_file(cache_folder, files, quantization, device, dtype)
    quantized = (read_layers(kept, device) if kept else None) or {}
    if not _fits(quantized, expected):
        quantized = {}
    write_back = kept is not None and not quantized

    def wanted(key: str) -> bool:
        target = _target_name(key)
        return target is None or target[0].rpartition(".")[0] not in quantized

    def finish(name: str) -> None:
        found = parts.pop(name)
        state[name] = (
            found[0] if slots[name] == 1 else torch.cat([found[i] for i in range(slots[name])])
        )
        module_name = name.rpartition(".")[0]
        if quantization and quantizable(module_name) and module_name != "output":
            _quantize_when_whole(module_name, state, expected, quantized, quantization)

    for path in files:
        try:
            for key, tensor in read_tensors(path, device, dtype, wanted):
                target = _target_name(key)
                if target is None:
                    continue
                if adjust is not None:
                    tensor = adjust(key, tensor)
                name, slot, slots[name] = target
                if shard is not None:
                    tensor = shard.take(name, slot, tensor)
                parts.setdefault(name, {})[slot] = tensor
                if len(parts[name]) == slots[name]:
                    finish(name)
        except OSError as error:
            raise ModelLoadError(f"cannot read {path.name}: {error}") from None
    if parts:
        name, found = next(iter(parts.items()))
        raise ModelLoadError(f"checkpoint lacks part of {name} ({len(found)} of {slots[name]})")
    head_kept = "output" in quantized
    if config.tie_word_embeddings and "tok_embeddings.weight" in state and not head_kept:
        state["output.weight"] = state["tok_embeddings.weight"]
    if quantization and not head_kept:
        head = head_quantization(quantization)
        _quantize_when_whole("output", state, expected, quantized, head)
    _check_complete(state, expected, quantized)
    if write_back and kept is not None:
        write_layers(kept, quantized)
    for module_name, module in quantized.items():
        model.set_submodule(module_name, module)
    model.load_state_dict(state, assign=True, strict=False)
    return model.eval().requires_grad_(False)


def _quantize_when_whole(
    module_name: str,
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    quantized: dict[str, nn.Module],
    quantization: str,
) -> None:
    """Replace a linear layer by its quantised form once its weight (and bias, if it has one)
    are read, dropping the full-precision tensors."""
    names = [n for n in (f"{module_name}.weight", f"{module_name}.bias") if n in expected]
    if not all(n in state for n in names):
        return
    tensors = {n: state.pop(n) for n in names}
    for name, tensor in tensors.items():
        _check_tensor_shape(name, tensor, expected[name])
    weight = tensors[f"{module_name}.weight"]
    quantized[module_name] = quantize_linear(
        weight, tensors.get(f"{module_name}.bias"), quantization
    )


def _fits(layers: dict[str, nn.Module], expected: dict[str, torch.Tensor]) -> bool:
    """Whether kept layers are the model's own: each a quantisable module of its shape."""
    for module_name, layer in layers.items():
        weight = expected.get(f"{module_name}.weight")
        shape = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if weight is None or not quantizable(module_name) or tuple(weight.shape) != shape:
            return False
    return True


def _target_name(key: str) -> tuple[str, int, int] | None:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key], 0, 1
    match = _LAYER_KEY.fullmatch(key)
    if match and match.group(2) in _LAYER_PARTS:
        layer, part, kind = match.groups()
        ours, slot, slot_count = _LAYER_PARTS[part]
        return f"layers.{layer}.{ours}.{kind}", slot, slot_count
    if _IGNORED.fullmatch(key):
        return None
    raise ModelLoadError(f"unexpected tensor {key!r} in the checkpoint: not a LLaMA layout")


def _check_complete(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    quantized: dict[str, nn.Module],
) -> None:
    loaded = set(state) | {name for name in expected if name.rpartition(".")[0] in quantized}
    missing = [name for name in expected if name not in loaded]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ModelLoadError(f"checkpoint is missing {shown}")
    for name, tensor in state.items():
        if name not in expected:
            raise ModelLoadError(f"checkpoint has {name}, which the config does not describe")
        _check_tensor_shape(name, tensor, expected[name])


def _check_tensor_shape(name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if tensor.shape != expected.shape:
        raise ModelLoadError(
            f"{name} has shape {tuple(tensor.shape)} but the config implies {tuple(expected.shape)}"
        )
