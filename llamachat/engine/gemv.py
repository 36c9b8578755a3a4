"""Triton kernels for one token times a weight matrix, plain or quantised (CUDA).

A decode step multiplies one activation row by every weight matrix: a matrix-vector product,
bound by reading the weights. Dequantising into a bf16 copy first would read the small weights,
write a big copy and read it again; these kernels read each packed byte once and do the
arithmetic in registers, in float32. Each program owns BLOCK_N output rows and walks the input
axis; the GPU's many programs keep enough loads in flight to fill the memory bus.

Imported only on CUDA (Triton ships with PyTorch's CUDA builds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALED: tl.constexpr,
):
    # Weights int8 with a scale per row (SCALED), or plain half-precision ones.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * K + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0,
        )
        acc += w.to(tl.float32) * x[None, :]
    total = tl.sum(acc, axis=1)
    if SCALED:
        total *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
):
    # A group of GROUP columns is GROUP/2 bytes: byte j holds column j (low nibble) and column
    # j + GROUP/2 (high), with one scale and one offset: w = q·scale + offset. Per group,
    # Σ w·x = scale·Σ q·x + offset·Σ x. Each step covers GROUPS groups of BLOCK_N rows.
    HALF: tl.constexpr = GROUP // 2
    n_groups: tl.constexpr = K // GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    group_ids = tl.arange(0, GROUPS)
    within = tl.arange(0, HALF)
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for first in range(0, n_groups, GROUPS):
        groups = first + group_ids
        group_ok = groups < n_groups
        x_at = groups[:, None] * GROUP + within[None, :]  # (GROUPS, HALF)
        x_low = tl.load(x_ptr + x_at, mask=group_ok[:, None], other=0.0).to(tl.float32)
        x_high = tl.load(x_ptr + x_at + HALF, mask=group_ok[:, None], other=0.0).to(tl.float32)
        bytes_at = groups[:, None] * HALF + within[None, :]  # (GROUPS, HALF), contiguous
        packed = tl.load(
            w_ptr + rows[:, None, None] * (K // 2) + bytes_at[None, :, :],
            mask=row_ok[:, None, None] & group_ok[None, :, None],
            other=0,
        )
        low = (packed & 15).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        qx = tl.sum(low * x_low[None, :, :] + high * x_high[None, :, :], axis=2)  # (BN, GROUPS)
        x_sum = tl.sum(x_low + x_high, axis=1)  # (GROUPS,)
        at = rows[:, None] * n_groups + groups[None, :]
        pair_ok = row_ok[:, None] & group_ok[None, :]
        scale = tl.load(scale_ptr + at, mask=pair_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + at, mask=pair_ok, other=0.0).to(tl.float32)
        acc += scale * qx + offset * x_sum[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_dequantize_kernel(
    w_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (row block, group): BLOCK_N rows of one group, packed bytes → weights.
    HALF: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    row_ok = rows[:, None] < N
    within = tl.arange(0, HALF)[None, :]
    packed = tl.load(w_ptr + rows[:, None] * (K // 2) + group * HALF + within, mask=row_ok, other=0)
    at = rows * (K // GROUP) + group
    scale = tl.load(scale_ptr + at, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    offset = tl.load(offset_ptr + at, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    low = (packed & 15).to(tl.float32) * scale + offset
    high = (packed >> 4).to(tl.float32) * scale + offset
    out = out_ptr + rows[:, None] * K + group * GROUP + within
    tl.store(out, low.to(out_ptr.dtype.element_ty), mask=row_ok)
    tl.store(out + HALF, high.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (1, K) · weight (N, K)ᵀ → (1, N) for half-precision weights."""
    return _row_kernel(x, weight, weight, scaled=False)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1, K) · (weight int8 (N, K) · scale (N,))ᵀ → (1, N) in x's dtype."""
    return _row_kernel(x, weight, scale, scaled=True)


def _row_kernel(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scaled: bool
) -> torch.Tensor:
    # One row per program, 1024 columns a step: in a sweep on an H100 over the Llama-3-8B and
    # Llama-2-7B matrices this beat cuBLAS by 8-21% in bf16 (cuBLAS runs fewer, longer blocks
    # for one row) and every other tiling in int8, except that int8 rows of 8192+ bytes went
    # faster with 2048 columns and 8 warps (docs/BENCHMARKS.md).
    n, k = weight.shape
    long_int8 = scaled and k >= 8192
    block_k = min(2048 if long_int8 else 1024, triton.next_power_of_2(k))
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(n,)](
        x.contiguous(), weight, scale, out, n, k, BLOCK_N=1, BLOCK_K=block_k, SCALED=scaled,
        num_warps=8 if long_int8 else 4, num_stages=3,
    )  # fmt: skip
    return out


def int4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int
) -> torch.Tensor:
    """x (1, K) · dequantised(packed (N, K/2), scale, offset (N, K/group))ᵀ → (1, N)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    # From a sweep on an H100 over the Llama-3-8B matrices in groups of 32: one row and 64
    # groups (1 KiB of weights) a step was the fastest for every one.
    block_n, groups = 1, 64
    _int4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x.contiguous(), packed, scale, offset, out, n, k, group, BLOCK_N=block_n, GROUPS=groups,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return out


def int4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """The (N, K) weight in `dtype`, for multi-token products (prefill) that go to cuBLAS."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    _int4_dequantize_kernel[(triton.cdiv(n, 32), k // group)](
        packed, scale, offset, out, n, k, group, BLOCK_N=32
    )
    return out
