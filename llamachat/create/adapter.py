"""A PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors), read and
checked against the base checkpoint it is for.

For each module it targets, the adapter holds A (rank × in) and B (out × rank), and the module's
weight becomes W + scaling · B·A, with scaling = alpha / rank (alpha / √rank with rsLoRA;
`rank_pattern` and `alpha_pattern` set them per module). An embedding's pair is stored
transposed (lora_embedding_A: rank × vocabulary). `modules_to_save` are whole tensors that
replace the base's, such as a resized `embed_tokens` and `lm_head` for an extended vocabulary.
Names are the checkpoint's (Hugging Face layout), before the engine stacks q/k/v and gate/up.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..models.errors import StoreError
from ..models.manifest import sha256_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_PREFIX = "base_model.model."
# module.lora_A.weight / module.lora_B.weight (an adapter name between them when saved raw),
# module.lora_embedding_A / _B for an embedding.
# A module saved whole: module.modules_to_save[.adapter name].weight, or module.weight.
_SAVED_KEY = re.compile(r"\.modules_to_save(\.[\w-]+)?\.weight$")
_PAIR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(\.[\w-]+)?")


class AdapterError(StoreError):
    """An adapter that cannot be applied to the base: the message names the problem."""


@dataclass(frozen=True)
class LoraPair:
    target: str  # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    a: str  # its keys in the adapter file
    b: str
    rank: int
    scaling: float
    embedding: bool  # stored transposed: the change is (B·A)ᵀ


@dataclass(frozen=True)
class LoraAdapter:
    folder: Path
    rank: int
    alpha: float
    rslora: bool
    pairs: dict[str, LoraPair]  # by target
    replaced: dict[str, str]  # modules_to_save: target → key in the adapter file
    sha256: str  # of adapter_model.safetensors
    tokenizer_files: tuple[str, ...]  # a tokenizer of its own (an extended vocabulary)
    source: Path | None = None  # what it was read from, when not `folder` (a GGUF file)

    @property
    def origin(self) -> Path:
        return self.source or self.folder

    @classmethod
    def read(cls, folder: Path) -> LoraAdapter:
        """The adapter in `folder`. Raises AdapterError, saying what is missing or unusable."""
        if not folder.is_dir():
            what = "not a folder (a PEFT LoRA folder or a .gguf file)" if folder.exists() else None
            raise AdapterError(f"adapter {folder}: {what or 'no such folder'}")
        config = _config(folder)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise AdapterError(f"adapter {folder}: no {ADAPTER_WEIGHTS} (only safetensors)")
        rank, alpha, rslora = config["r"], config["lora_alpha"], config["use_rslora"]
        pairs: dict[str, dict[str, Any]] = {}
        replaced: dict[str, str] = {}
        try:
            with safe_open(weights, framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types
            problem = f"cannot read {ADAPTER_WEIGHTS} ({error})"
            raise AdapterError(f"adapter {folder}: {problem}") from None
        for key, shape in shapes.items():
            name = key.removeprefix(_PREFIX)
            if ".original_module." in name:  # peft's copy of the base module: not the change
                continue
            if "lora_magnitude_vector" in name:
                raise AdapterError(f"adapter {folder}: DoRA adapters are not supported")
            match = _PAIR_KEY.fullmatch(name.removesuffix(".weight"))
            if match is None:
                if not name.endswith(".weight") or "lora_" in name:
                    raise AdapterError(f"adapter {folder}: unexpected tensor {key!r}")
                replaced[_SAVED_KEY.sub(".weight", name)] = key  # a module saved whole
                continue
            module = match["module"]
            pair = pairs.setdefault(module, {"embedding": bool(match["embedding"])})
            pair[match["side"]] = (key, shape)
        built = {}
        for module, pair in pairs.items():
            if "A" not in pair or "B" not in pair:
                raise AdapterError(f"adapter {folder}: {module} has only half of its LoRA pair")
            (a_key, a_shape), (b_key, b_shape) = pair["A"], pair["B"]
            found = a_shape[0]  # A is rank × in (an embedding's: rank × vocabulary)
            if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != found:
                raise AdapterError(f"adapter {folder}: {module}'s A and B do not multiply")
            expected = _pattern_value(config["rank_pattern"], module, rank)
            if found != expected:
                raise AdapterError(
                    f"adapter {folder}: {module} has rank {found}, its config says {expected}"
                )
            module_alpha = _pattern_value(config["alpha_pattern"], module, alpha)
            scaling = module_alpha / (math.sqrt(found) if rslora else found)
            target = f"{module}.weight"
            built[target] = LoraPair(target, a_key, b_key, found, scaling, pair["embedding"])
        if not built and not replaced:
            raise AdapterError(f"adapter {folder}: {ADAPTER_WEIGHTS} holds no LoRA weights")
        tokenizer = tuple(name for name in TOKENIZER_FILES if (folder / name).is_file())
        return cls(folder, rank, alpha, rslora, built, replaced, sha256_of(weights), tokenizer)

    def check(self, base_shapes: dict[str, tuple[int, ...]], base_name: str) -> None:
        """Raise AdapterError unless every pair fits a tensor of the base (`base_shapes`: the
        checkpoint's names and shapes, after any replacement)."""
        for target, pair in self.pairs.items():
            shape = base_shapes.get(target)
            if shape is None:
                raise AdapterError(
                    f"adapter {self.origin} changes {target}, which {base_name} does not have"
                    " (an adapter for another architecture?)"
                )
            change = self._change_shape(pair)
            if change != shape:
                raise AdapterError(
                    f"adapter {self.origin} is for a different shape: its {target} is"
                    f" {_shape(change)}, {base_name}'s is {_shape(shape)}"
                    " (another model size or hidden size?)"
                )

    def _change_shape(self, pair: LoraPair) -> tuple[int, ...]:
        with safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt") as handle:
            a = tuple(handle.get_slice(pair.a).get_shape())
            b = tuple(handle.get_slice(pair.b).get_shape())
        return (a[1], b[0]) if pair.embedding else (b[0], a[1])

    def change(self, target: str) -> torch.Tensor:
        """scaling · B·A for `target`, in float32."""
        pair = self.pairs[target]
        with safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt") as handle:
            a = handle.get_tensor(pair.a).float()
            b = handle.get_tensor(pair.b).float()
        product = b @ a
        return pair.scaling * (product.T if pair.embedding else product)

    def replacement(self, target: str) -> torch.Tensor:
        with safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt") as handle:
            return handle.get_tensor(self.replaced[target])

    def replacement_shape(self, target: str) -> tuple[int, ...]:
        with safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt") as handle:
            return tuple(handle.get_slice(self.replaced[target]).get_shape())


def _config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"adapter {folder}: no {ADAPTER_CONFIG}") from None
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter {folder}: cannot read {ADAPTER_CONFIG} ({error})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter {folder}: {ADAPTER_CONFIG} is not a JSON object")
    kind = data.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(f"adapter {folder}: a {kind} adapter; only LoRA is supported")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if data.get(unsupported):
            raise AdapterError(f"adapter {folder}: {unsupported} adapters are not supported")
    if data.get("lora_bias"):
        raise AdapterError(f"adapter {folder}: LoRA biases are not supported")
    rank, alpha = data.get("r"), data.get("lora_alpha")
    if not _number(rank) or rank != int(rank) or rank <= 0:
        raise AdapterError(f"adapter {folder}: {ADAPTER_CONFIG} has no usable rank 'r'")
    if not _number(alpha):
        raise AdapterError(f"adapter {folder}: {ADAPTER_CONFIG} has no usable 'lora_alpha'")
    patterns = {}
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = data.get(name) or {}
        if not isinstance(pattern, dict) or not all(_number(v) for v in pattern.values()):
            raise AdapterError(f"adapter {folder}: {ADAPTER_CONFIG}'s {name} is not usable")
        patterns[name] = pattern
    return {
        "r": int(rank),
        "lora_alpha": float(alpha),
        "use_rslora": bool(data.get("use_rslora")),
        **patterns,
    }


def _pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    """A rank_pattern / alpha_pattern entry for `module`, as peft matches them: a key names the
    module's last parts, or is a regular expression for them."""
    for key, value in pattern.items():
        try:
            if re.fullmatch(rf"(.*\.)?({key})", module):
                return value
        except re.error:
            if module == key or module.endswith(f".{key}"):
                return value
    return default


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(n) for n in shape)
