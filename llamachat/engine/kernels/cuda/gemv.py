"""Triton kernels for one token times a weight matrix, plain or quantised (CUDA).

A decode step multiplies one activation row by every weight matrix: a matrix-vector product,
bound by reading the weights. Dequantising into a bf16 copy first would read the small weights,
write a big copy and read it again; these kernels read each packed byte once and do the
arithmetic in registers. Each program owns a few output rows and walks the input axis; the GPU's
many programs keep enough loads in flight to fill the memory bus.

bf16 weights multiply in float32. int4 weights would need an unpack, an int→float conversion
and an FMA per weight, which caps a float kernel near half the memory bandwidth (measured:
1.3-1.7 TB/s of packed bytes on an H100, whatever the tiling); so the activation row is first
rounded to int8 in groups of 32 (llama.cpp's Q8_1 idea) and four products at a time run as one
integer dot-product instruction (dp4a). int8 weights go the same way (int8_dp4a_gemv):
converting each weight byte to float held the float kernel (int8_gemv, kept for rows not made
of whole groups) at 63-82% of an H200's copy bandwidth. Groups are quantize.GROUP = 32 columns; the
rounding is activations.py's.

Imported only on CUDA (Triton ships with PyTorch's CUDA builds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import Int8Activations, round_to_int8
from .launch import _INTERPRETED, await_previous_kernel, launch_options


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
    PDL: tl.constexpr = False,
):
    # Weights int8 with a scale per row (SCALED), or plain half-precision ones.
    await_previous_kernel(PDL)
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
def _dp4a(a, b, c):
    # c + Σ over the 4 bytes of a (unsigned) · the 4 bytes of b (signed): four products in one
    # instruction, where float arithmetic needs an unpack, a conversion and an FMA for each.
    if _INTERPRETED:
        total = c
        for i in tl.static_range(4):
            total += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return total
    else:
        return tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True,
            pack=1,
        )  # fmt: skip


@triton.jit
def _int4_gemv_kernel(
    xq_ptr,
    x_scale_ptr,
    x_sum_ptr,
    w_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    ROWS: tl.constexpr,
    GROUPS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Int32 word w of a row holds columns 8w+b (low nibble of byte b) and 8w+4+b (high), so
    # `word & 0x0F0F0F0F` and `(word >> 4) & 0x0F0F0F0F` are four bytes each that pair with four
    # consecutive int8 activations. A group (32 columns) is 4 words with one scale and offset:
    # Σ w·x = scale·Σ q·x + offset·Σ x, and Σ q·x = x_scale · Σ q·xq in integers.
    await_previous_kernel(PDL)
    n_words: tl.constexpr = K // 8
    n_groups: tl.constexpr = K // 32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    word = tl.arange(0, 4)
    acc = tl.zeros((ROWS, GROUPS), dtype=tl.float32)
    for first in range(0, n_groups, GROUPS):
        groups = first + tl.arange(0, GROUPS)
        group_ok = groups < n_groups
        # Activation words for each weight word: (GROUPS, 4, 2) → low and high halves.
        x_at = (groups[:, None] * 8 + word[None, :] * 2)[:, :, None] + tl.arange(0, 2)[
            None, None, :
        ]
        x_low, x_high = tl.split(tl.load(xq_ptr + x_at, mask=group_ok[:, None, None], other=0))
        w_at = rows[:, None, None] * n_words + (groups[:, None] * 4 + word[None, :])[None, :, :]
        ok = row_ok[:, None, None] & group_ok[None, :, None]
        words = tl.load(w_ptr + w_at, mask=ok, other=0)
        low = words & 0x0F0F0F0F
        high = (words >> 4) & 0x0F0F0F0F
        dot = _dp4a(low, tl.broadcast_to(x_low[None], low.shape), tl.zeros_like(low))
        dot = _dp4a(high, tl.broadcast_to(x_high[None], high.shape), dot)
        x_scale = tl.load(x_scale_ptr + groups, mask=group_ok, other=0.0)
        x_sum = tl.load(x_sum_ptr + groups, mask=group_ok, other=0.0)
        at = rows[:, None] * n_groups + groups[None, :]
        pair_ok = row_ok[:, None] & group_ok[None, :]
        scale = tl.load(scale_ptr + at, mask=pair_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + at, mask=pair_ok, other=0.0).to(tl.float32)
        qx = tl.sum(dot, axis=2).to(tl.float32) * x_scale[None, :]
        acc += scale * qx + offset * x_sum[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _signed_dp4a(a, b, c):
    # c + Σ over the 4 signed bytes of a · the 4 signed bytes of b.
    if _INTERPRETED:
        total = c
        for i in tl.static_range(4):
            total += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return total
    else:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True,
            pack=1,
        )  # fmt: skip


@triton.jit
def _int8_dp4a_gemv_kernel(
    xq_ptr,
    x_scale_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    ROWS: tl.constexpr,
    GROUPS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # int8 weights (a scale per row) times the row rounded to int8 in groups of 32, four
    # products per dp4a: converting each weight byte to float caps the float kernel near the
    # conversion unit's rate, under the memory's. A group is 8 int32 words of each:
    # Σ w·x = row scale · Σ_groups x_scale · Σ q·xq. Each block of weights is
    # read while the one before is multiplied.
    n_words: tl.constexpr = K // 4
    n_groups: tl.constexpr = K // 32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    word = tl.arange(0, 8)
    w_at = rows[:, None, None] * n_words + (tl.arange(0, GROUPS)[:, None] * 8 + word[None, :])[None]
    await_previous_kernel(PDL)
    words = tl.load(
        w_ptr + w_at,
        mask=row_ok[:, None, None] & (tl.arange(0, GROUPS) < n_groups)[None, :, None],
        other=0,
    )
    acc = tl.zeros((ROWS, GROUPS), dtype=tl.float32)
    for first in range(0, n_groups, GROUPS):
        groups = first + tl.arange(0, GROUPS)
        group_ok = groups < n_groups
        x_words = tl.load(
            xq_ptr + groups[:, None] * 8 + word[None, :], mask=group_ok[:, None], other=0
        )
        current = words
        following_ok = row_ok[:, None, None] & (groups + GROUPS < n_groups)[None, :, None]
        words = tl.load(w_ptr + w_at + (first + GROUPS) * 8, mask=following_ok, other=0)
        dot = _signed_dp4a(
            current, tl.broadcast_to(x_words[None], current.shape), tl.zeros_like(current)
        )
        x_scale = tl.load(x_scale_ptr + groups, mask=group_ok, other=0.0)
        acc += tl.sum(dot, axis=2).to(tl.float32) * x_scale[None, :]
    total = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x (1, K) · weight (N, K)ᵀ → (1, N) for half-precision weights, in x's dtype or
    `out_dtype` (the float32 sums as they are, for logits)."""
    return _row_kernel(x, weight, weight, False, out_dtype or x.dtype)


def int8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (1, K) · (weight int8 (N, K) · scale (N,))ᵀ → (1, N) in x's dtype or `out_dtype`."""
    return _row_kernel(x, weight, scale, True, out_dtype or x.dtype)


def _row_kernel(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scaled: bool, dtype: torch.dtype
) -> torch.Tensor:
    # One row per program, 1024 columns a step: in a sweep on an H100 over the Llama-3-8B and
    # Llama-2-7B matrices this beat cuBLAS by 8-21% in bf16 (cuBLAS runs fewer, longer blocks
    # for one row) and every other tiling in int8, except that int8 rows of 8192+ bytes went
    # faster with 2048 columns and 8 warps (docs/BENCHMARKS.md).
    n, k = weight.shape
    long_int8 = scaled and k >= 8192
    block_k = min(2048 if long_int8 else 1024, triton.next_power_of_2(k))
    out = torch.empty((1, n), dtype=dtype, device=x.device)
    _gemv_kernel[(n,)](
        x.contiguous(), weight, scale, out, n, k, BLOCK_N=1, BLOCK_K=block_k, SCALED=scaled,
        num_warps=8 if long_int8 else 4, num_stages=3, **launch_options(),
    )  # fmt: skip
    return out


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    activations: Int8Activations | None = None,
) -> torch.Tensor:
    """x (1, K) · dequantised(packed (N, K/2), scale, offset (N, K/32))ᵀ → (1, N), with x
    rounded to int8 in groups of 32 as llama.cpp does for its 4-bit formats: the products run
    as integer dot products of four bytes (dp4a). `activations`: x already rounded, by the
    kernel that made x."""
    n, k = packed.shape[0], packed.shape[1] * 2
    xq, x_scale, x_sum = round_to_int8(x) if activations is None else activations
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    # From a sweep on an H200 over the Llama-3-8B matrices and its LM head: two rows, one warp
    # and 32 groups a step for the tall matrices, four rows and two warps for the rest (on an
    # H100 the same choices came within 6% of the best tiling for every matrix).
    rows, groups, warps = (2, 32, 1) if n >= 16384 else (4, 64, 2)
    _int4_gemv_kernel[(triton.cdiv(n, rows),)](
        xq.view(torch.int32), x_scale, x_sum, packed.view(torch.int32), scale, offset, out, n, k,
        ROWS=rows, GROUPS=groups, num_warps=warps, **launch_options(),
    )  # fmt: skip
    return out


def int8_dp4a_tiling(n: int, k: int) -> dict[str, int]:
    """The dp4a int8 kernel's tiling: two rows a program, 32 groups a step, four warps, for
    every matrix. Chosen by whole decode steps (benchmarks/decode_variants.py, H200, 8b int8:
    409 tok/s; four rows and two warps 400; one row for the tall matrices 371), not by
    gemv_sweep.py's matrices alone, whose best tilings (one row for gate/up and the head) were
    slower inside the step."""
    return {"ROWS": 2, "GROUPS": 32, "num_warps": 4, "num_stages": 3}


def int8_dp4a_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    activations: Int8Activations | None = None,
) -> torch.Tensor:
    """int8_gemv with x rounded to int8 in groups of 32 (as for int4_gemv), the products as
    integer dot products of four bytes. `activations`: x already rounded, by the kernel that
    made x."""
    n, k = weight.shape
    xq, x_scale, _ = round_to_int8(x) if activations is None else activations
    out = torch.empty((1, n), dtype=out_dtype or x.dtype, device=x.device)
    tiling = int8_dp4a_tiling(n, k)
    _int8_dp4a_gemv_kernel[(triton.cdiv(n, tiling["ROWS"]),)](
        xq.view(torch.int32), x_scale, weight.view(torch.int32), scale, out, n, k, **tiling,
        **launch_options(),
    )  # fmt: skip
    return out
