"""An activation row rounded to int8 in groups of 32, the input the int4 and int8 matrix-vector
kernels multiply (gemv.py) (CUDA).

Rounding is a kernel of its own (round_to_int8), or the tail of the kernel that made the row:
the fused decode kernels (fused.py) call store_int8_groups on their output, saving a launch.
quantize.quantize_activations is the same arithmetic in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import await_previous_kernel, launch_options

Int8Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@triton.jit
def store_int8_groups(values, first, q_ptr, scale_ptr, sum_ptr, LIMIT, BLOCK: tl.constexpr):
    # values: float32 (BLOCK,) of columns first .. first + BLOCK (first a multiple of 32). Each
    # group of 32 → int8 with one scale (largest |x| / 127) and the sum of the rounded values:
    # the offsets' term then multiplies the same x as the nibbles' term, so the error stays that
    # of x·w rather than x·q·scale (q in 0..15 is not centred on 0). Kernels that produce an
    # int4 layer's input call this too, saving a launch.
    groups = tl.reshape(values, (BLOCK // 32, 32))
    largest = tl.max(tl.abs(groups), axis=1)
    scale = tl.where(largest > 0, largest / 127.0, 1.0)
    q = tl.floor(groups / scale[:, None] + 0.5)
    group = first // 32 + tl.arange(0, BLOCK // 32)
    at = group[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(q_ptr + at, q.to(tl.int8), mask=at < LIMIT)
    group_ok = group * 32 < LIMIT
    tl.store(scale_ptr + group, scale, mask=group_ok)
    tl.store(sum_ptr + group, tl.sum(q, axis=1) * scale, mask=group_ok)


@triton.jit
def _quantize_activations_kernel(
    x_ptr, q_ptr, scale_ptr, sum_ptr, K, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    await_previous_kernel(PDL)
    first = tl.program_id(0) * BLOCK
    at = first + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + at, mask=at < K, other=0.0).to(tl.float32)
    store_int8_groups(x, first, q_ptr, scale_ptr, sum_ptr, K, BLOCK)


def int8_activations(k: int, device: torch.device) -> Int8Activations:
    """Empty buffers for a row of K activations rounded to int8 in groups of 32: (values int8
    (K,), scale (K/32,), sum of each group's rounded values (K/32,))."""
    return (
        torch.empty(k, dtype=torch.int8, device=device),
        torch.empty(k // 32, dtype=torch.float32, device=device),
        torch.empty(k // 32, dtype=torch.float32, device=device),
    )


def round_to_int8(x: torch.Tensor) -> Int8Activations:
    """x (1, K) → int8 in groups of 32 (quantize.quantize_activations is the same arithmetic in
    PyTorch)."""
    k = x.shape[-1]
    out = int8_activations(k, x.device)
    block = 512
    _quantize_activations_kernel[(triton.cdiv(k, block),)](
        x.contiguous(), *out, k, BLOCK=block, **launch_options()
    )
    return out
