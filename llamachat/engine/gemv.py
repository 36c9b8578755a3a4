"""Triton kernels for one token times a quantised weight matrix (CUDA).

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

_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in [
        (8, 256, 4, 3),
        (16, 256, 4, 3),
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (32, 512, 8, 3),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (128, 128, 8, 3),
    ]
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=1) * scale
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


_INT4_CONFIGS = [
    triton.Config({"BLOCK_N": n, "GROUPS": g}, num_warps=w, num_stages=s)
    for n, g, w, s in [
        (16, 4, 4, 3),
        (16, 8, 4, 3),
        (32, 4, 4, 3),
        (32, 8, 8, 3),
        (64, 2, 4, 4),
        (64, 4, 8, 3),
        (128, 2, 8, 3),
    ]
]


@triton.autotune(configs=_INT4_CONFIGS, key=["N", "K"])
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
    # Byte j of a row holds columns 2j (low nibble) and 2j+1 (high); a group of GROUP columns
    # is GROUP/2 bytes with one scale and one offset: w = q·scale + offset. Per group,
    # Σ w·x = scale·Σ q·x + offset·Σ x.
    HALF: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    n_groups: tl.constexpr = K // GROUP
    group_ids = tl.arange(0, GROUPS)
    byte_ids = group_ids[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (GROUPS, HALF)
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for first in range(0, n_groups, GROUPS):
        group_ok = first + group_ids < n_groups
        bytes_at = first * HALF + byte_ids
        bytes_ok = group_ok[:, None]
        x_even = tl.load(x_ptr + 2 * bytes_at, mask=bytes_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + 2 * bytes_at + 1, mask=bytes_ok, other=0.0).to(tl.float32)
        packed = tl.load(
            w_ptr + rows[:, None, None] * (K // 2) + bytes_at[None, :, :],
            mask=row_ok[:, None, None] & bytes_ok[None, :, :],
            other=0,
        )
        low = (packed & 15).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        qx = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)  # (BN, GROUPS)
        x_sum = tl.sum(x_even + x_odd, axis=1)  # (GROUPS,)
        at = rows[:, None] * n_groups + first + group_ids[None, :]
        pair_ok = row_ok[:, None] & group_ok[None, :]
        scale = tl.load(scale_ptr + at, mask=pair_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + at, mask=pair_ok, other=0.0).to(tl.float32)
        acc += scale * qx + offset * x_sum[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1, K) · (weight int8 (N, K) · scale (N,))ᵀ → (1, N) in x's dtype."""
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_gemv_kernel[grid](x.contiguous(), weight, scale, out, n, k)
    return out


def int4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int
) -> torch.Tensor:
    """x (1, K) · dequantised(packed (N, K/2), scale, offset (N, K/group))ᵀ → (1, N)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int4_gemv_kernel[grid](x.contiguous(), packed, scale, offset, out, n, k, group)
    return out
