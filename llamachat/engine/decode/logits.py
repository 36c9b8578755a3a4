"""Float32 logits from the LM head on a GPU: its sums as they are, not rounded to bf16 first.

The head's products accumulate in float32 on every device; a half-precision model would write
them in its own dtype, and the best tokens' logits are often closer than one bf16 step (0.125
near 30), so sampling should see which is larger (docs/BENCHMARKS.md: what it changes).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantize import Int8Linear

Int8Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def float32_logits(
    head: nn.Module, h: torch.Tensor, rounded: Int8Activations | None = None
) -> torch.Tensor:
    """Float32 logits (..., V) of the final norm's output h (..., D) on a GPU; `rounded`: one
    row h rounded to int8 in groups, for an int8 head that multiplies it so."""
    flat = h.reshape(-1, h.shape[-1])
    if isinstance(head, Int8Linear):
        out = head(flat, out_dtype=torch.float32, activations=rounded)
    elif isinstance(head, nn.Linear) and head.bias is None:
        if flat.shape[0] == 1:
            from ..kernels.cuda.gemv import gemv

            out = gemv(flat, head.weight, torch.float32)
        else:
            out = torch.mm(flat, head.weight.T, out_dtype=torch.float32)
    else:
        return head(h).float()
    return out.view(*h.shape[:-1], out.shape[-1])
