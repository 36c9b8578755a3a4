"""The decode step's small kernels (kernels/cuda/fused.py) on one row of a shape, over their
launch choices: device µs a call, replayed from a CUDA graph (gemv_sweep.timed), for the
residual add + RMSNorm (with and without the int8 rounding), SwiGLU's gate, rotary + cache write,
and the attention's two kernels by number of chunks. What a token pays besides its matrix
products.

    python benchmarks/small_kernels_probe.py --shape 8b --position 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemv_sweep import timed  # noqa: E402

from llamachat.engine.bench import SHAPES  # noqa: E402
from llamachat.engine.kernels.cuda.activations import int8_activations  # noqa: E402
from llamachat.engine.kernels.cuda.fused import (  # noqa: E402
    _add_rms_norm_kernel,
    _rope_and_cache_kernel,
    _silu_mul_kernel,
    attention_chunks,
    decode_attention,
)


def report(kernel: str, choice: dict, seconds: float) -> None:
    print(json.dumps({"kernel": kernel, **choice, "us": round(seconds * 1e6, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--position", type=int, default=256)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    d, width = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd, span = d // heads, 1024
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}

    x, delta, weight = (torch.randn(1, d, **bf16) for _ in range(3))
    normed = torch.empty_like(x)
    rounded = int8_activations(d, x.device)
    for quantize in (False, True):
        for warps in (1, 2, 4, 8, 16):
            launch = lambda q=quantize, w=warps: _add_rms_norm_kernel[(1,)](  # noqa: E731
                x, delta, weight, normed, *rounded, 1e-5, d, triton.next_power_of_2(d),
                QUANTIZE=q, num_warps=w,
            )  # fmt: skip
            report("add_rms_norm", {"quantize": quantize, "warps": warps}, timed(launch))

    gate_up = torch.randn(1, 2 * width, **bf16)
    gated = torch.empty(1, width, **bf16)
    rounded = int8_activations(width, x.device)
    for block in (512, 1024, 2048, 4096):
        for warps in (1, 2, 4, 8):
            launch = lambda b=block, w=warps: _silu_mul_kernel[(triton.cdiv(width, b), 1)](  # noqa: E731
                gate_up, gated, *rounded, width, BLOCK=b, QUANTIZE=True, num_warps=w
            )  # fmt: skip
            report("silu_mul", {"block": block, "warps": warps}, timed(launch))

    qkv = torch.randn(1, (heads + 2 * kv) * hd, **bf16)
    cos, sin = torch.randn(span, hd, device="cuda"), torch.randn(span, hd, device="cuda")
    position = torch.tensor([args.position], device="cuda")
    k_cache, v_cache = (torch.randn(kv, span, hd, **bf16) * 0.1 for _ in range(2))
    q = torch.empty(1, heads, hd, **bf16)
    for warps in (1, 2, 4):
        launch = lambda w=warps: _rope_and_cache_kernel[(heads + 2 * kv, 1)](  # noqa: E731
            qkv, cos, sin, position, position, q, k_cache, v_cache, span, heads, kv, hd, False,
            num_warps=w,
        )  # fmt: skip
        report("rope_and_cache", {"warps": warps}, timed(launch))

    in_use = attention_chunks(args.position + 1)
    for chunks in sorted({1, 2, 4, 8, 16, in_use}):
        launch = lambda c=chunks: decode_attention(q, k_cache, v_cache, position, c, True)  # noqa: E731
        report("decode_attention", {"chunks": chunks, "in_use": chunks == in_use}, timed(launch))


if __name__ == "__main__":
    main()
