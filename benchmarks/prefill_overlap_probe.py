"""Whether a quantised prompt's bf16 weight copies can hide behind the matrix products: the
8b shape's four matrices a layer, 32 layers, M prompt rows, timed three ways on one GPU —
bf16 weights, each weight dequantised then multiplied (the engine today), and the next
weight dequantised on a side stream while this one multiplies (two buffers).

    python benchmarks/prefill_overlap_probe.py --rows 512 --formats int8 int4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine.kernels.cuda.prefill import int4_dequantize, int8_dequantize  # noqa: E402
from llamachat.engine.quantize import Int4Linear, Int8Linear  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate/up, down


def timed(run, repeats: int = 5) -> float:
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bf16_copy(layer: nn.Module) -> torch.Tensor:
    """The engine's bf16 copy of a quantised weight, made for a prompt above 384 rows."""
    if isinstance(layer, Int8Linear):
        return int8_dequantize(layer.weight, layer.scale, torch.bfloat16)
    return int4_dequantize(layer.weight, layer.scale, layer.offset, torch.bfloat16)


def copied_then_multiplied(xs: list[torch.Tensor], layers: list[nn.Module]) -> None:
    for x, layer in zip(xs, layers, strict=True):
        torch.mm(x, bf16_copy(layer).T)


def copied_on_a_second_stream(
    xs: list[torch.Tensor], layers: list[nn.Module], side: torch.cuda.Stream
) -> None:
    """Each weight's copy made on `side` while the product before it runs on the main stream;
    the caching allocator holds a copy until the product that reads it is done."""
    main_stream = torch.cuda.current_stream()
    with torch.cuda.stream(side):
        following = bf16_copy(layers[0])
    for step, x in enumerate(xs):
        main_stream.wait_stream(side)
        weight = following
        weight.record_stream(main_stream)
        if step + 1 < len(layers):
            with torch.cuda.stream(side):
                following = bf16_copy(layers[step + 1])
        torch.mm(x, weight.T)


def measured(layers: list[nn.Module], dense: list[torch.Tensor], rows: int, repeat: int) -> dict:
    """Milliseconds for `repeat` layers of the four products, the three ways and the copies."""
    inputs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _, k in SHAPES}
    xs = [inputs[k] for _, k in SHAPES] * repeat
    quantised, weights = layers * repeat, dense * repeat
    side = torch.cuda.Stream()
    return {
        "bf16_ms": timed(lambda: [torch.mm(x, w.T) for x, w in zip(xs, weights, strict=True)]),
        "serial_ms": timed(lambda: copied_then_multiplied(xs, quantised)),
        "overlapped_ms": timed(lambda: copied_on_a_second_stream(xs, quantised, side)),
        "copies_alone_ms": timed(lambda: [bf16_copy(layer) for layer in quantised]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[512])
    parser.add_argument("--formats", nargs="+", default=["int8", "int4"])
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in SHAPES]
    for form in args.formats:
        kind = Int8Linear if form == "int8" else Int4Linear
        layers = [kind(weight, None) for weight in dense]
        for rows in args.rows:
            times = measured(layers, dense, rows, args.layers)
            rounded = {name: round(ms, 3) for name, ms in times.items()}
            print(json.dumps({"format": form, "rows": rows, **rounded}), flush=True)


if __name__ == "__main__":
    main()
