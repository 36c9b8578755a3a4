"""The one-token (decode) step, chosen once for a model when it loads.

A decode step is forward()'s arithmetic for one token; where the device allows, a route with far
fewer operations runs it (Transformer.forward calls the model's `decode_step`):

- cuda.FusedDecodeStep: fused Triton kernels on a GPU in half precision (kernels/cuda/);
- native.NativeDecodeStep: an int4 model on an x86 CPU, the whole step one call into C
  (kernels/cpu/);
- cpu.CpuDecodeStep: PyTorch on the CPU, in about a third of forward()'s operations.

Anywhere else (a GPU in float32, or without Triton) forward() runs the token itself.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Protocol

import torch

from .cpu import CpuDecodeStep
from .native import NativeDecodeStep

if TYPE_CHECKING:
    from ..kv_cache import KVCache
    from ..model import Transformer


class Logits(Protocol):
    def __call__(self, head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits (..., V) of the final norm's output h (..., D) through `head`."""
        ...


def choose_logits(transformer: Transformer) -> Logits | None:
    """How this model's head writes float32 logits: its float32 sums as they are on a GPU in
    half precision (logits.py); None where casting its output loses nothing."""
    weight = transformer.tok_embeddings.weight
    if weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16):
        from .logits import float32_logits

        return float32_logits
    return None


class DecodeStep(Protocol):
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attend_len: int
    ) -> torch.Tensor:
        """Logits (1, 1, V) for the token (1, 1) at `positions` (1,), its keys and values
        written into the cache, attention reading it up to `attend_len`."""
        ...


def choose_decode_step(transformer: Transformer, native: bool = True) -> DecodeStep | None:
    """The first route that runs this model here: the fused CUDA kernels, the C step (unless
    `native` is False), the PyTorch CPU step; None where forward() runs the token itself."""
    if fused_kernels_fit(transformer):
        from .cuda import FusedDecodeStep  # imports Triton

        return FusedDecodeStep(transformer)
    step = NativeDecodeStep.for_model(transformer) if native else None
    if step is not None:
        return step
    if transformer.tok_embeddings.weight.device.type == "cpu":
        return CpuDecodeStep(transformer)
    return None


def fused_kernels_fit(transformer: Transformer) -> bool:
    """Whether the fused decode kernels take this model: CUDA, half precision, head_dim a power
    of two, at most 16 query heads per kv head, and Triton importable."""
    weight = transformer.tok_embeddings.weight
    head_dim, groups = transformer.config.head_dim, transformer.config.n_groups
    return (
        weight.device.type == "cuda"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and groups <= 16
        and importlib.util.find_spec("triton") is not None
    )
