"""Triton kernels for products of several activation rows (a prompt) by quantised weights (CUDA).

Prefill is bound by arithmetic, so the tensor cores must do the work. int8: the kernel loads a
tile of int8 weights, turns it into bf16 in registers (exactly: they are small integers; the
per-row scale applies to the fp32 sums) and feeds `tl.dot`. Dequantising the whole matrix to a
bf16 copy first, then calling cuBLAS, wrote and re-read twice the bf16 weights for every prompt.
int4: the weight is dequantised once per call and the product goes to cuBLAS (a version that
unpacked nibbles and group scales per tile measured 10× slower than dequantising).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Programs walk GROUP_M row tiles per column tile, so the weight tiles they share stay in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows_in_group
    tile_n = (pid % per_group) // rows_in_group
    return tile_m, tile_n


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    tile_m, tile_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=(rows[:, None] < M) & (k < K))
        w = tl.load(
            w_ptr + columns[:, None] * K + k[None, :], mask=(columns[:, None] < N) & (k < K)
        )
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    acc *= tl.load(scale_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * N + columns[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (columns < N))


_TILES = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


def int8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (M, K) · (weight int8 (N, K) · scale (N,))ᵀ → (M, N) in x's dtype or `out_dtype`."""
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(m, _TILES["BLOCK_M"]) * triton.cdiv(n, _TILES["BLOCK_N"]),)
    _int8_matmul_kernel[grid](x.contiguous(), weight, scale, out, m, n, k, **_TILES)
    return out


@triton.jit
def _int4_dequantize_kernel(
    w_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (row block, group): BLOCK_N rows of one group of 32 columns, packed → weights.
    # Byte j of the group (j = 4c + b, word c) holds column 8c + b low and 8c + 4 + b high.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    row_ok = rows[:, None] < N
    j = tl.arange(0, 16)
    packed = tl.load(w_ptr + rows[:, None] * (K // 2) + group * 16 + j[None, :], mask=row_ok)
    at = rows * (K // 32) + group
    scale = tl.load(scale_ptr + at, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    offset = tl.load(offset_ptr + at, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    low = (packed & 15).to(tl.float32) * scale + offset
    high = (packed >> 4).to(tl.float32) * scale + offset
    out = out_ptr + rows[:, None] * K + group * 32 + ((j // 4) * 8 + j % 4)[None, :]
    tl.store(out, low.to(out_ptr.dtype.element_ty), mask=row_ok)
    tl.store(out + 4, high.to(out_ptr.dtype.element_ty), mask=row_ok)


def int4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The (N, K) weight in `dtype`, for multi-token products (prefill) that go to cuBLAS."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    _int4_dequantize_kernel[(triton.cdiv(n, 32), k // 32)](
        packed, scale, offset, out, n, k, BLOCK_N=32
    )
    return out
