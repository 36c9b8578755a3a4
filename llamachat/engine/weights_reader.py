"""Reading safetensors files into device memory, several tensors at a time.

A safetensors file is an 8-byte header length, a JSON header (name → dtype, shape, byte range)
and the raw bytes. The file is memory-mapped and each tensor's bytes are viewed in place and
copied to the device by a pool of threads: copies from the page cache to the GPU overlap and
run with the GIL released, where the safetensors package reads one tensor after another
(8B bf16 model, warm page cache, H100: ~10 s that way; see docs/BENCHMARKS.md for ours).
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from .errors import ModelLoadError

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
WORKERS = 8


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def read_header(path: Path, mapped: mmap.mmap) -> list[StoredTensor]:
    """The tensors listed in a safetensors file's header, checked against the file's size."""
    size = len(mapped)
    (length,) = struct.unpack("<Q", mapped[:8]) if size >= 8 else (size,)
    if 8 + length > size:
        raise ModelLoadError(f"{path.name} is not a safetensors file (bad header length)")
    try:
        header = json.loads(mapped[8 : 8 + length])
        entries = [
            (name, entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
            for name, entry in header.items()
            if name != "__metadata__"
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{path.name} has an unreadable safetensors header") from None
    tensors = []
    for name, kind, shape, begin, end in entries:
        dtype = DTYPES.get(kind)
        if dtype is None:
            raise ModelLoadError(f"{path.name}: {name} has unsupported dtype {kind}")
        start = 8 + length + begin
        if end - begin != prod(shape) * dtype.itemsize or start + (end - begin) > size:
            raise ModelLoadError(f"{path.name}: {name} has a bad byte range (truncated file?)")
        tensors.append(StoredTensor(name, dtype, shape, start, end - begin))
    return tensors


def read_tensors(
    path: Path, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on `device`, cast to `dtype` when given) for every tensor in the file, in
    the header's order; up to 2 × WORKERS copies are in flight at once."""
    with open(path, "rb") as handle:
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path.name} is empty")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        tensors = read_header(path, mapped)
        with ThreadPoolExecutor(WORKERS) as pool:
            pending: deque[tuple[str, Future[torch.Tensor]]] = deque()
            for stored in tensors:
                pending.append((stored.name, pool.submit(_copy, mapped, stored, device, dtype)))
                if len(pending) >= 2 * WORKERS:
                    name, future = pending.popleft()
                    yield name, future.result()
            while pending:
                name, future = pending.popleft()
                yield name, future.result()
    finally:
        mapped.close()


def _copy(
    mapped: mmap.mmap, stored: StoredTensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    if stored.nbytes == 0:
        return torch.empty(stored.shape, dtype=dtype or stored.dtype, device=device)
    with warnings.catch_warnings():
        # The mapping is read-only; the view is only ever copied from.
        warnings.simplefilter("ignore", UserWarning)
        view = torch.frombuffer(
            mapped, dtype=stored.dtype, count=prod(stored.shape), offset=stored.start
        ).view(stored.shape)
    # Copy in the stored dtype, then convert where the tensor lands (on the GPU, not the CPU).
    tensor = view.to(device, copy=True)
    return tensor if dtype is None else tensor.to(dtype)
