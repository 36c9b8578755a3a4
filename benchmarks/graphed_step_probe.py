"""What a graphed mixed step costs on a GPU, per row: prompt rows riding along with decoding rows
as the rows of one CUDA graph (decode/batch.py: BatchedGpuStep.as_rows), against the same rows
through the flash kernel launched op by op (`mixed`) and a decode-only step.

    python benchmarks/graphed_step_probe.py --shape 8b [--sweep]

Each case is the median device time (CUDA events) of 10 steps after 3 warm-ups: 64 decoding
rows at position --context, and prompt chunks of ~600-token prompts (the serve bench's) from
position 0 or further in. The as_rows cases run twice: with the prompt rows packed
rows_per_pack to an attention program (how the step runs) and one to a program (each prompt
row reading its keys alone, how it ran before), to show what the packing saves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine.bench import random_model  # noqa: E402
from llamachat.engine.decode.batch import BatchedGpuStep, PromptChunk  # noqa: E402


def device_ms(call, runs: int = 10) -> float:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
        began.record()
        call()
        ended.record()
        torch.cuda.synchronize()
        times.append(began.elapsed_time(ended))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--context", type=int, default=650)
    parser.add_argument(
        "--sweep", action="store_true", help="also: steps of 128 to 768 rows, 64 apart"
    )
    args = parser.parse_args()
    model = random_model(args.shape)
    config = model.config
    slots, capacity = 72, 1024
    shape = (config.n_layers, slots + 1, config.n_kv_heads, capacity, config.head_dim)
    k_pool = torch.randn(shape, device="cuda", dtype=model.dtype) * 0.1
    v_pool = torch.randn_like(k_pool)
    model.transformer.setup_rope(capacity)
    step = BatchedGpuStep(model.transformer, k_pool, v_pool, scratch=slots)
    decoding = 64
    tokens, rows_slots = [3] * decoding, list(range(decoding))
    positions = [args.context] * decoding
    cases = {  # name: prompt chunks beside the decoding rows
        "decode only": [],
        "+ 320 rows, one prompt's start": [PromptChunk(64, 0, [7] * 320)],
        "+ 320 rows, one prompt's end": [PromptChunk(64, 280, [7] * 320)],
        "+ 448 rows, 2 prompts": [PromptChunk(64, 0, [7] * 300), PromptChunk(65, 400, [7] * 148)],
        "+ 448 rows, 1 prompt's end": [PromptChunk(64, 150, [7] * 448)],
    }
    packed = step.rows_per_pack
    print(f"rows per attention program: {packed}\n")
    print("| step | rows | as_rows ms | µs/row | unpacked ms | mixed (eager) ms |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, chunks in cases.items():
            rows = decoding + sum(len(c.tokens) for c in chunks)
            call = (tokens, rows_slots, positions, chunks)
            step.rows_per_pack = packed
            graphed = device_ms(lambda call=call: step.as_rows(*call))
            step.rows_per_pack = 1
            unpacked = device_ms(lambda call=call: step.as_rows(*call))
            eager = device_ms(lambda call=call: step.mixed(*call)) if chunks else float("nan")
            print(
                f"| {name} | {rows} | {graphed:.2f} | {1000 * graphed / rows:.1f} |"
                f" {unpacked:.2f} | {eager:.2f} |"
            )
    step.rows_per_pack = packed
    if not args.sweep:
        return
    # What each row count costs, 64 of them decoding and the rest one prompt's rows from
    # position 150: the rows a step is given (--step-tokens) land on these shapes.
    print("\n| rows | ms | µs/row | µs per prompt row beyond decode-only |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        alone = device_ms(lambda: step(tokens, rows_slots, positions))
        for rows in range(128, 769, 64):
            call = (tokens, rows_slots, positions, [PromptChunk(64, 150, [7] * (rows - 64))])
            took = device_ms(lambda call=call: step.as_rows(*call))
            print(
                f"| {rows} | {took:.2f} | {1000 * took / rows:.1f} |"
                f" {1000 * (took - alone) / (rows - 64):.1f} |"
            )


if __name__ == "__main__":
    main()
