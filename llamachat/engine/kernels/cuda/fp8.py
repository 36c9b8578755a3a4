"""FP8 (E4M3) products on GPUs with FP8 tensor cores (compute capability 8.9: Ada, Hopper).

Weights are E4M3 with one float32 scale per output row (channel); activations are rounded to
E4M3 per row as they come (a scale per token: its largest |x| / 448, E4M3's largest value), so
that a prompt multiplies on the FP8 tensor cores, twice bf16's rate on a Hopper, through
cuBLASLt's row-wise scaled product (torch._scaled_mm). One row (a decode step) goes through a
Triton kernel instead that rounds the row itself, bound by reading the weights: a byte each, as
int8's. Both compute Σ xq·wq in float32 times the two scales; quantize.fp8_reference is the same
in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import await_previous_kernel, launch_options


@triton.jit
def _round_rows_kernel(
    x_ptr, q_ptr, scale_ptr, K, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):  # fmt: skip
    # One program per row: its largest |x| over the whole row, then the row over that / 448.
    await_previous_kernel(PDL)
    row = tl.program_id(0)
    largest = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        at = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + at, mask=at < K, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.abs(x))
    top = tl.max(largest, axis=0)
    scale, inverse = _scale_of(top)
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        at = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + at, mask=at < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + at, (x * inverse).to(tl.float8e4nv), mask=at < K)


@triton.jit
def _scale_of(top):
    # As quantize.round_rows_fp8 computes them, bit for bit: the scale is the row's largest |x|
    # times 1/448 (PyTorch divides by a number so), the row is multiplied by its reciprocal,
    # correctly rounded (Triton's `/` is the approximate one).
    scale = tl.where(top > 0, top * (1.0 / 448.0), 1.0)
    return scale, tl.math.div_rn(tl.full((), 1.0, tl.float32), scale)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, out_ptr, N, K: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # The row is rounded here, not by _round_rows_kernel first: one launch a product, not two.
    # Every program finds the row's largest |x| itself (the row is a few KB, read from L2; a
    # program owns several rows so that few read it), then rounds each block of it as
    # _round_rows_kernel does, bit for bit, before multiplying.
    await_previous_kernel(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    largest = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        at = start + tl.arange(0, BLOCK_K)
        largest = tl.maximum(largest, tl.abs(tl.load(x_ptr + at, mask=at < K, other=0.0)))
    x_scale, inverse = _scale_of(tl.max(largest, axis=0).to(tl.float32))
    acc = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        ok = cols < K
        x = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        xq = (x * inverse).to(tl.float8e4nv).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0
        )
        acc += w.to(tl.float32) * xq[None, :]
    total = tl.sum(acc, axis=1) * (tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0) * x_scale)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv_tiling(n: int, k: int) -> dict[str, int]:
    """The one-row kernel's tiling for an (N, K) weight (benchmarks/gemv_sweep.py --formats fp8
    measures the others)."""
    return {"ROWS": 8, "BLOCK_K": min(1024, triton.next_power_of_2(k)), "num_warps": 4,
            "num_stages": 3}  # fmt: skip


def round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (E4M3 (M, K), float32 scales (M, 1)), x ≈ q · scale row by row."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = min(4096, triton.next_power_of_2(k))
    _round_rows_kernel[(m,)](
        x.contiguous(), q, scale, k, BLOCK=block, num_warps=8, **launch_options()
    )
    return q, scale


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """x (M, K) · (weight E4M3 (N, K) · scale (1, N))ᵀ → (M, N) in `out_dtype` (bf16, or
    float32 for logits at one row), x rounded to E4M3 per row first."""
    (m, k), n = x.shape, weight.shape[0]
    if m == 1:
        out = torch.empty((1, n), dtype=out_dtype, device=x.device)
        tiling = gemv_tiling(n, k)
        _fp8_gemv_kernel[(triton.cdiv(n, tiling["ROWS"]),)](
            x.contiguous(), weight, scale, out, n, k, **tiling, **launch_options()
        )
        return out
    xq, x_scale = round_rows(x)
    # cuBLASLt's row-wise scaling writes bf16; the second operand is read column-major, which
    # weight (N, K) row-major is, transposed.
    out = torch._scaled_mm(xq, weight.T, scale_a=x_scale, scale_b=scale, out_dtype=torch.bfloat16)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
