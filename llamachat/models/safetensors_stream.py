"""Writing a safetensors file one tensor at a time.

The safetensors package wants every tensor of a file in memory at once, and numpy has no
bfloat16; a dequantised 7B model is 28 GB in float32. The format is a length-prefixed JSON header
and the raw bytes after it, so the header can be written from the shapes alone and the data
streamed behind it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ITEM_SIZES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype: F32, F16 or BF16
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  # produces the data, C-ordered, of exactly nbytes

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEM_SIZES[self.dtype]


def write_safetensors(
    path: Path,
    entries: Iterable[TensorEntry],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> None:
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for entry in entries:
            data = np.ascontiguousarray(entry.load())
            if data.nbytes != entry.nbytes:
                raise ValueError(
                    f"{entry.name}: produced {data.nbytes} bytes, expected {entry.nbytes}"
                )
            file.write(memoryview(data).cast("B"))
            if on_tensor is not None:
                on_tensor(entry)
