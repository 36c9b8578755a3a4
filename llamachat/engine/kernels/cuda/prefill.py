"""Triton kernels for products of several activation rows (a prompt) by quantised weights (CUDA).

Prefill is bound by arithmetic, so the tensor cores must do the work. int8, up to
quantize.PROMPT_KERNEL_ROWS rows: the kernel loads a tile of int8 weights, turns it into bf16 in
registers (exactly: they are small integers; the per-row scale applies to the fp32 sums) and
feeds `tl.dot`, reading the int8 weight once. More rows: one pass writes a bf16 copy of the
weight times its scales (int8_dequantize) and cuBLAS multiplies by it, faster than the Triton
kernel's tiles from 512 rows on. int4: the weight is dequantised once per call and the product
goes to cuBLAS (a version that unpacked nibbles and group scales per tile measured 10× slower).
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
    tiles: dict[str, int] | None = None,
) -> torch.Tensor:
    """x (M, K) · (weight int8 (N, K) · scale (N,))ᵀ → (M, N) in x's dtype or `out_dtype`.
    `tiles`: another tiling than _TILES (benchmarks/int8_prefill_sweep.py)."""
    (m, k), n = x.shape, weight.shape[0]
    tiles = tiles or _TILES
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)
    _int8_matmul_kernel[grid](x.contiguous(), weight, scale, out, m, n, k, **tiles)
    return out


@triton.jit
def _int8_dequantize_kernel(
    w_ptr, scale_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    columns = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < N) & (columns[None, :] < K)
    at = rows[:, None] * K + columns[None, :]
    w = tl.load(w_ptr + at, mask=ok, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (w * scale[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


def int8_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight times its rows' scales, in `dtype`, in one pass."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    rows, columns = 16, 512
    _int8_dequantize_kernel[(triton.cdiv(n, rows), triton.cdiv(k, columns))](
        weight, scale, out, n, k, BLOCK_N=rows, BLOCK_K=columns, num_warps=4
    )
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
    GROUPS: tl.constexpr,
):
    # Program (row block, group block): BLOCK_N rows of GROUPS groups of 32 columns, packed →
    # weights. Byte j of a group (j = 4c + b, word c) holds column 8c + b low and 8c + 4 + b
    # high: each word's low and high nibbles are put side by side in registers, so that every
    # row's GROUPS · 32 columns go out as one contiguous store.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    ok = (rows[:, None] < N) & (groups[None, :] < K // 32)
    j = tl.arange(0, 16)
    packed_at = rows[:, None, None] * (K // 2) + groups[None, :, None] * 16 + j[None, None, :]
    packed = tl.load(w_ptr + packed_at, mask=ok[:, :, None])  # (BLOCK_N, GROUPS, 16)
    at = rows[:, None] * (K // 32) + groups[None, :]
    scale = tl.load(scale_ptr + at, mask=ok, other=0.0).to(tl.float32)[:, :, None]
    offset = tl.load(offset_ptr + at, mask=ok, other=0.0).to(tl.float32)[:, :, None]
    low = (packed & 15).to(tl.float32) * scale + offset
    high = (packed >> 4).to(tl.float32) * scale + offset
    # (rows, groups, word, byte) twice → (rows, groups, word, low/high, byte) → 32 columns
    pairs = tl.join(
        tl.reshape(low, (BLOCK_N, GROUPS, 4, 4)), tl.reshape(high, (BLOCK_N, GROUPS, 4, 4))
    )
    weights = tl.reshape(tl.permute(pairs, (0, 1, 2, 4, 3)), (BLOCK_N, GROUPS * 32))
    columns = tl.program_id(1) * GROUPS * 32 + tl.arange(0, GROUPS * 32)
    out = out_ptr + rows[:, None] * K + columns[None, :]
    store_ok = (rows[:, None] < N) & (columns[None, :] < K)
    tl.store(out, weights.to(out_ptr.dtype.element_ty), mask=store_ok)


def int4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The (N, K) weight in `dtype`, for multi-token products (prefill) that go to cuBLAS."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    # 16 rows of 512 columns a program: 3.3 TB/s read and written on an H200 (the 8b gate/up
    # and down matrices), where a program per group of 32 columns, storing its two halves apart,
    # ran at 1.5-1.8 (int4 prefill of 512 tokens: 11.6k tok/s then, 23.2k now).
    rows, groups = 16, 16
    _int4_dequantize_kernel[(triton.cdiv(n, rows), triton.cdiv(k // 32, groups))](
        packed, scale, offset, out, n, k, BLOCK_N=rows, GROUPS=groups, num_warps=4
    )
    return out
