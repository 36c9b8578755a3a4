"""Quantised weights kept on disk, so that the next load reads them instead of quantising again.

Loading SmolLM2 as int4 on a CPU reads 541 MB of float32 and spends half a second quantising
it; the quantised layers are 90 MB. The first load in a format writes them to a safetensors file
in the folder it is given (the model's `quantized/`), named by a digest of what they were made
from: the checkpoint files' names, sizes and modification times, the format, the device kind,
the layout the CPU's kernels take, and this engine's quantisation code. A later load with the
same digest reads them; anything else quantises as before and replaces the file. A file that
cannot be read (truncated, another layout) is ignored and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from . import quantize
from .errors import ModelLoadError
from .kernels.cpu import native
from .quantize import HalfWeightLinear, Int4Linear, Int8Linear
from .weights_reader import read_metadata, read_tensors

FORMAT = "1"  # this file's own layout: the metadata and tensor names below
_LAYERS: dict[str, type[Int4Linear] | type[Int8Linear]] = {
    "int4": Int4Linear,
    "int8": Int8Linear,
}


def cache_file(
    folder: Path,
    checkpoint: Sequence[Path],
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Path | None:
    """Where `checkpoint`'s weights quantised as `quantization` on `device` are kept; None for
    a format with nothing worth keeping (f16's packed matrices are not tensors)."""
    if quantization not in _LAYERS:
        return None
    digest = hashlib.sha256()
    for part in (FORMAT, quantization, device.type, str(dtype), str(_native_layout(device))):
        digest.update(part.encode() + b"\0")
    digest.update(Path(quantize.__file__).read_bytes())
    for path in checkpoint:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return folder / f"{quantization}-{device.type}-{digest.hexdigest()[:20]}.safetensors"


def read_layers(path: Path, device: torch.device) -> dict[str, nn.Module] | None:
    """The quantised layers kept at `path`, by module name, on `device`; None when there is no
    such file or it is not one this code wrote."""
    if not path.exists():
        return None
    try:
        metadata = read_metadata(path)
        kinds = json.loads(metadata.get("layers", ""))
        if metadata.get("format") != FORMAT or not isinstance(kinds, dict):
            return None
        stored: dict[str, dict[str, torch.Tensor]] = {}
        # Each tensor in memory of its own: PyTorch's CPU int8 kernel reads its operands with
        # aligned loads, and a view into the file's bytes is only 8-byte aligned.
        for name, tensor in read_tensors(path, device):
            module_name, _, part = name.rpartition(".")
            stored.setdefault(module_name, {})[part] = tensor
        layers: dict[str, nn.Module] = {}
        for module_name, kind in kinds.items():
            tensors = stored.pop(module_name)
            bias = tensors.pop("bias", None)
            layers[module_name] = _LAYERS[kind].from_stored(tensors, bias)
    except (OSError, ValueError, KeyError, TypeError, ModelLoadError):
        return None
    return layers if not stored else None


def write_layers(path: Path, layers: dict[str, nn.Module]) -> None:
    """Keep `layers` at `path`, private to the user, replacing what was kept for the same
    model in the same format and device kind. Written whole under a temporary name and renamed,
    so a killed load leaves the old file or the new one. A full disk or a read-only folder
    only means the next load quantises again."""
    if any(isinstance(layer, HalfWeightLinear) for layer in layers.values()):
        return
    kinds = {n: "int4" if isinstance(m, Int4Linear) else "int8" for n, m in layers.items()}
    tensors: dict[str, torch.Tensor] = {}
    for module_name, layer in layers.items():
        for part, tensor in layer.stored_tensors().items():
            tensors[f"{module_name}.{part}"] = tensor
        if layer.bias is not None:
            tensors[f"{module_name}.bias"] = layer.bias
    metadata = {"format": FORMAT, "layers": json.dumps(kinds)}
    temporary = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
        os.close(handle)  # mkstemp's file is the user's alone (0600); save_file keeps that
        save_file({k: t.contiguous() for k, t in tensors.items()}, temporary, metadata)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        temporary = None
        kind = path.name.rsplit("-", 1)[0]
        for old in path.parent.glob(f"{kind}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, SafetensorError):
        pass
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def _native_layout(device: torch.device) -> bool:
    """Whether int4 layers here take the C kernels' layout (else PyTorch's packing)."""
    return device.type != "cpu" or native.library() is not None
