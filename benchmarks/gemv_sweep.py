"""The one-row kernels (kernels/cuda/gemv.py) on each matrix of a shape, over their tilings:
time per call, bytes read per second, and the share of the card's copy bandwidth, for the
tiling in use and the best one found. What says whether a format's decode is bound by memory
or by instructions on this card.

    python benchmarks/gemv_sweep.py --shape 8b [--formats int8 int8-dp4a int4 fp8]

Random weights of the shape's matrices (qkv, o, gate/up, down, the LM head), quantised as the
engine quantises them; each tiling timed with CUDA events over 300 calls replayed from a CUDA graph.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine.bench import SHAPES, copy_bandwidth  # noqa: E402
from llamachat.engine.kernels.cuda.activations import round_to_int8  # noqa: E402
from llamachat.engine.kernels.cuda.fp8 import _fp8_gemv_kernel, gemv_tiling  # noqa: E402
from llamachat.engine.kernels.cuda.gemv import (  # noqa: E402
    _gemv_kernel,
    _int4_gemv_kernel,
    _int8_dp4a_gemv_kernel,
    int8_dp4a_tiling,
)
from llamachat.engine.quantize import Fp8Linear, Int4Linear, Int8Linear  # noqa: E402


def matrices(shape: dict) -> dict[str, tuple[int, int]]:
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = d // heads
    return {
        "qkv": ((heads + 2 * kv) * hd, d), "o": (d, heads * hd), "gate_up": (2 * f, d),
        "down": (d, f), "head": (v, d),
    }  # fmt: skip


def timed(launch, calls: int = 100) -> float:
    """Seconds a call on the GPU's clock, the calls replayed from a CUDA graph as a decode step
    replays them (launched one by one from Python, a small matrix would time the launch)."""
    for _ in range(3):
        launch()  # compiled and warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            launch()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (3 * calls)


def int8_tilings(n: int, k: int):
    for rows, block_k, warps, stages in itertools.product(
        (1, 2, 4), (1024, 2048, 4096), (4, 8), (3, 4)
    ):
        if block_k <= triton.next_power_of_2(k):
            yield {"BLOCK_N": rows, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def int4_tilings(n: int, k: int):
    for rows, groups, warps, stages in itertools.product(
        (1, 2, 4, 8), (32, 64, 128), (1, 2, 4), (3,)
    ):
        if groups <= k // 32:
            yield {"ROWS": rows, "GROUPS": groups, "num_warps": warps, "num_stages": stages}


def int8_dp4a_tilings(n: int, k: int):
    for rows, groups, warps, stages in itertools.product(
        (1, 2, 4, 8), (16, 32, 64), (1, 2, 4), (3,)
    ):
        if groups <= k // 32:
            yield {"ROWS": rows, "GROUPS": groups, "num_warps": warps, "num_stages": stages}


def fp8_tilings(n: int, k: int):
    for rows, block_k, warps, stages in itertools.product(
        (4, 8, 16), (512, 1024, 2048), (4, 8), (3, 4)
    ):
        if block_k <= triton.next_power_of_2(k):
            yield {"ROWS": rows, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def fp8_run(layer: Fp8Linear, x: torch.Tensor, tiling: dict):
    n, k = layer.weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, tiling["ROWS"]),)
    return lambda: _fp8_gemv_kernel[grid](x, layer.weight, layer.scale, out, n, k, **tiling)


def int8_run(layer: Int8Linear, x: torch.Tensor, tiling: dict):
    n, k = layer.weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, tiling["BLOCK_N"]),)
    return lambda: _gemv_kernel[grid](
        x, layer.weight, layer.scale, out, n, k, SCALED=True, **tiling
    )


def int8_dp4a_run(layer: Int8Linear, x: torch.Tensor, tiling: dict):
    n, k = layer.weight.shape
    xq, x_scale, _ = round_to_int8(x)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, tiling["ROWS"]),)
    return lambda: _int8_dp4a_gemv_kernel[grid](
        xq.view(torch.int32), x_scale, layer.weight.view(torch.int32), layer.scale, out, n, k,
        **tiling,
    )  # fmt: skip


def int4_run(layer: Int4Linear, x: torch.Tensor, tiling: dict):
    n, k = layer.weight.shape[0], layer.weight.shape[1] * 2
    xq, x_scale, x_sum = round_to_int8(x)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, tiling["ROWS"]),)
    return lambda: _int4_gemv_kernel[grid](
        xq.view(torch.int32), x_scale, x_sum, layer.weight.view(torch.int32), layer.scale,
        layer.offset, out, n, k, **tiling,
    )  # fmt: skip


IN_USE = {  # what gemv.py launches today, by matrix height and width
    "int8": lambda n, k: {
        "BLOCK_N": 1, "BLOCK_K": min(2048 if k >= 8192 else 1024, triton.next_power_of_2(k)),
        "num_warps": 8 if k >= 8192 else 4, "num_stages": 3,
    },
    "int4": lambda n, k: dict(
        zip(("ROWS", "GROUPS", "num_warps"), (2, 32, 1) if n >= 16384 else (4, 64, 2),
            strict=True), num_stages=3,
    ),
    "fp8": gemv_tiling,
    "int8-dp4a": int8_dp4a_tiling,
}  # fmt: skip
LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear, "int8-dp4a": Int8Linear}
RUNS = {"int8": int8_run, "int4": int4_run, "fp8": fp8_run, "int8-dp4a": int8_dp4a_run}
TILINGS = {
    "int8": int8_tilings, "int4": int4_tilings, "fp8": fp8_tilings,
    "int8-dp4a": int8_dp4a_tilings,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--formats", nargs="+", default=["int8", "int4"])
    args = parser.parse_args()
    bandwidth = copy_bandwidth("cuda", size=2 * 1024**3)  # bytes read + written a second
    print(json.dumps({"copy_bandwidth_tb_s": bandwidth / 1e12}))
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in matrices(SHAPES[args.shape]).items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=generator)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=generator)
        for form in args.formats:
            layer, run, tilings = LAYERS[form](weight, None), RUNS[form], TILINGS[form]
            nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
            found = []
            for tiling in tilings(n, k):
                try:
                    found.append((timed(run(layer, x, tiling)), tiling))
                except Exception:  # a tiling Triton cannot build (too many registers)
                    continue
            current = timed(run(layer, x, IN_USE[form](n, k)))
            best_time, best = min(found, key=lambda pair: pair[0])
            print(json.dumps({
                "matrix": name, "format": form, "shape": [n, k], "bytes": nbytes,
                "in_use_us": round(current * 1e6, 2),
                "in_use_share": round(nbytes / current / bandwidth, 3),
                "best_us": round(best_time * 1e6, 2),
                "best_share": round(nbytes / best_time / bandwidth, 3), "best": best,
            }))  # fmt: skip
            del layer
        del weight


if __name__ == "__main__":
    main()
