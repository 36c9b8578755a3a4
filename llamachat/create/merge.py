"""LoRA adapters merged into a base checkpoint, one tensor at a time.

Each output file is the base's file of the same name with the same tensors in the same order:
a tensor an adapter changes is read, widened to float32, given every adapter's scaling · B·A in
turn and rounded back to the base's dtype, then streamed to disk behind a header written from the
shapes alone (models/safetensors_stream.py). Only one tensor of the base is in memory at a time.
A module an adapter saves whole (modules_to_save) takes the base tensor's place, in the base's
dtype; a resized embedding makes a new vocabulary size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..engine.loading import weight_files
from ..models.safetensors_stream import ITEM_SIZES, TensorEntry, write_safetensors
from .adapter import AdapterError, LoraAdapter

EMBEDDINGS = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Planned:
    name: str
    dtype: str
    shape: tuple[int, ...]
    replaced_by: LoraAdapter | None  # the last adapter that saves it whole
    changed_by: tuple[LoraAdapter, ...]


@dataclass(frozen=True)
class Plan:
    """What the adapters make of the base's checkpoint, checked: each tensor's file, dtype and
    final shape, which adapter replaces it and which change it."""

    files: dict[str, dict[str, tuple[str, tuple[int, ...]]]]  # file → name → (dtype, shape)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    replaced_by: dict[str, LoraAdapter]
    extra: list[str]  # tensors the base lacks: an lm_head of its own for a tied base
    vocab_size: int | None  # the new vocabulary's size, when an adapter resized it

    @classmethod
    def of(
        cls, base: Path, config: dict[str, Any], adapters: list[LoraAdapter], base_name: str
    ) -> Plan:
        """Raises AdapterError for an adapter that does not fit the base."""
        files = {path.name: _header(path) for path in weight_files(base)}
        shapes = {name: shape for header in files.values() for name, (_, shape) in header.items()}
        dtypes = {name: dtype for header in files.values() for name, (dtype, _) in header.items()}
        replaced_by: dict[str, LoraAdapter] = {}
        extra: list[str] = []
        for adapter in adapters:
            for target in adapter.replaced:
                if target not in shapes:
                    if not (target == LM_HEAD and config.get("tie_word_embeddings")):
                        raise AdapterError(
                            f"adapter {adapter.origin} saves {target}, which {base_name} does"
                            " not have (an adapter for another architecture?)"
                        )
                    extra.append(target)
                    dtypes[target] = dtypes[EMBEDDINGS]  # the weights it was tied to
                shapes[target] = adapter.replacement_shape(target)
                replaced_by[target] = adapter
        for adapter in adapters:
            adapter.check(shapes, base_name)
        vocab_size = _new_vocabulary(shapes, config, adapters, base_name)
        return cls(files, shapes, dtypes, replaced_by, extra, vocab_size)


def merge_checkpoint(
    base: Path,
    plan: Plan,
    adapters: list[LoraAdapter],
    out: Path,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Write the merged checkpoint of `base` (as `plan` found it) into `out`; returns how many
    tensors changed. `on_tensor(bytes)` after each tensor written."""

    def planned(name: str) -> _Planned:
        changed = tuple(a for a in adapters if name in a.pairs)
        return _Planned(
            name, plan.dtypes[name], plan.shapes[name], plan.replaced_by.get(name), changed
        )

    changed = 0
    names = list(plan.files)
    for number, (file_name, header) in enumerate(plan.files.items()):
        tensors = [planned(name) for name in header]
        if number == len(names) - 1:
            tensors += [planned(name) for name in plan.extra]
        changed += sum(1 for t in tensors if t.replaced_by or t.changed_by)
        with safe_open(base / file_name, framework="pt") as handle:
            entries = [TensorEntry(t.name, t.dtype, t.shape, _loader(t, handle)) for t in tensors]
            report = (lambda entry: on_tensor(entry.nbytes)) if on_tensor else None
            write_safetensors(out / file_name, entries, on_tensor=report)
    _write_index(base, out, plan.files, plan.extra, names[-1], plan.shapes, plan.dtypes)
    return changed


def adjust_on_loading(adapters: list[LoraAdapter]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The engine's `adjust` (engine/loading.py) that applies the adapters as the base's tensors
    are read, in the dtype and on the device they are read into: what merge_checkpoint writes,
    without writing it."""
    replaced_by = {target: a for a in adapters for target in a.replaced}

    def adjust(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in replaced_by:
            tensor = replaced_by[name].replacement(name).to(tensor.device, tensor.dtype)
        changes = [adapter for adapter in adapters if name in adapter.pairs]
        if not changes:
            return tensor
        total = tensor.float()
        for adapter in changes:
            total += adapter.change(name).to(tensor.device)
        return total.to(tensor.dtype)

    return adjust


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's safetensors dtype and shape, in the file's order."""
    with safe_open(path, framework="pt") as handle:
        header = {}
        for name in handle.keys():
            tensor = handle.get_slice(name)
            header[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    for name, (dtype, _) in header.items():
        if dtype not in ITEM_SIZES:
            raise AdapterError(f"{path.name} holds {name} as {dtype}: only F32, F16 and BF16 merge")
    return header


def _new_vocabulary(
    shapes: dict[str, tuple[int, ...]],
    config: dict[str, Any],
    adapters: list[LoraAdapter],
    base_name: str,
) -> int | None:
    """The vocabulary size a resized embedding gives, checked against the head and a
    tokenizer to go with it; None when it is the base's."""
    size = shapes[EMBEDDINGS][0] if EMBEDDINGS in shapes else config.get("vocab_size")
    if size == config.get("vocab_size"):
        return None
    head = shapes.get(LM_HEAD)
    if head is not None and head[0] != size:
        raise AdapterError(
            f"the adapters resize {base_name}'s embeddings to {size} tokens but its lm_head"
            f" to {head[0]}"
        )
    if not any(adapter.tokenizer_files for adapter in adapters):
        raise AdapterError(
            f"the adapters resize {base_name}'s vocabulary to {size} tokens but bring no"
            " tokenizer (tokenizer.json or tokenizer.model beside adapter_config.json)"
        )
    return size


def _loader(planned: _Planned, handle: Any) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if planned.replaced_by is not None:
            tensor = planned.replaced_by.replacement(planned.name)
            dtype = _TORCH_DTYPES[planned.dtype]
        else:
            tensor = handle.get_tensor(planned.name)
            dtype = tensor.dtype
        if planned.changed_by:
            total = tensor.float()
            for adapter in planned.changed_by:
                total += adapter.change(planned.name)
            tensor = total
        return _raw(tensor.to(dtype).contiguous())

    return load


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as an array numpy has a type for (it has none for bfloat16)."""
    if tensor.dtype is torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _write_index(
    base: Path,
    out: Path,
    files: dict[str, dict[str, tuple[str, tuple[int, ...]]]],
    extra: list[str],
    last: str,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
) -> None:
    """A sharded base's index, for the merged shards (a tensor added goes to the last)."""
    if not (base / INDEX).is_file():
        return
    weight_map = {name: file for file, header in files.items() for name in header}
    weight_map.update({name: last for name in extra})
    total = sum(
        int(np.prod(shapes[name], dtype=np.int64)) * ITEM_SIZES[dtypes[name]] for name in weight_map
    )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
