"""Host values to the device without waiting for it.

A plain copy from host memory to a GPU (what `torch.tensor(values, device=...)` makes) waits
for everything queued on the device's stream to finish first, holding Python's lock all the
while: in a batch step that is the whole forward pass, during which no other thread of the
process runs. From pinned memory the copy is queued like any kernel instead.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list, nested or not) as a tensor on `device`, queued rather than waited
    for on a GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
