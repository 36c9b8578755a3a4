"""int8 prompt products on each matrix of a shape at one prompt length: the paths the engine
can take (quantize.Int8Linear: the Triton kernel over its tilings; a bf16 copy then cuBLAS, the
scales applied to the output or folded into the copy) beside bf16's cuBLAS product, in ms a call.
What decides which path a long int8 prompt takes (issue 16, target 3).

    python benchmarks/int8_prefill_sweep.py --shape 8b --rows 4000
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_step_probe import timed  # noqa: E402
from gemv_sweep import matrices  # noqa: E402

from llamachat.engine.bench import SHAPES  # noqa: E402
from llamachat.engine.kernels.cuda.prefill import int8_dequantize, int8_matmul  # noqa: E402
from llamachat.engine.quantize import Int8Linear  # noqa: E402


def tilings():
    for m, n, k, warps, stages in itertools.product(
        (64, 128), (128, 256), (64, 128), (4, 8), (3, 4)
    ):
        yield dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)


def measure(name: str, n: int, k: int, rows: int, generator: torch.Generator) -> dict:
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    layer = Int8Linear(weight, None)
    q, scale = layer.weight, layer.scale
    row: dict = {"matrix": name, "shape": [n, k], "rows": rows}
    row["bf16_ms"] = timed(lambda: x @ weight.T)
    row["copy_then_scale_out_ms"] = timed(lambda: torch.mm(x, q.to(x.dtype).T) * scale)
    row["scaled_copy_ms"] = timed(lambda: torch.mm(x, int8_dequantize(q, scale, x.dtype).T))
    row["dequantize_ms"] = timed(lambda: int8_dequantize(q, scale, x.dtype))
    found = []
    for tiling in tilings():
        try:
            found.append((timed(lambda t=tiling: int8_matmul(x, q, scale, tiles=t)), tiling))
        except Exception:  # a tiling Triton cannot build (shared memory)
            continue
    row["triton_in_use_ms"] = timed(lambda: int8_matmul(x, q, scale))
    row["triton_best_ms"], row["triton_best"] = min(found, key=lambda pair: pair[0])
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--rows", type=int, default=4000)
    args = parser.parse_args()
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in matrices(SHAPES[args.shape]).items():
        if name != "head":  # a prompt's head reads one row
            print(json.dumps(measure(name, n, k, args.rows, generator)), flush=True)


if __name__ == "__main__":
    main()
