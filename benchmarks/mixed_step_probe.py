"""Where a mixed step's time goes on a GPU: the host's time launching it against the device's
time running it, for prompt chunks riding along with decoding rows (decode/batch.py:
BatchedGpuStep.mixed), and which operations the host spends it in.

    python benchmarks/mixed_step_probe.py --shape 8b

For each case (decoding rows, number of chunks sharing 2,048 prompt tokens): the median over 10
calls of the host's launch time (the call alone, nothing waited for) and the device's time
(CUDA events around the call), then the device's time by kernel for two of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine.bench import random_model  # noqa: E402
from llamachat.engine.decode.batch import BatchedGpuStep, PromptChunk  # noqa: E402


def cases(slots: int, prompt: int, context: int):
    for rows, room in ((0, 0), (64, 0), (64, 64)):  # room: prompt tokens left for the rows
        for count in (1, 2, 4):
            size = (prompt - room) // count
            chunks = [PromptChunk(rows + i, 0, [7] * size) for i in range(count)]
            yield (
                f"{rows}{' (in the 2,048)' if room else ''}",
                count,
                ([3] * rows, list(range(rows)), [context] * rows, chunks),
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--context", type=int, default=600)
    args = parser.parse_args()
    model = random_model(args.shape)
    config = model.config
    slots, capacity = 72, 2048
    shape = (config.n_layers, slots + 1, config.n_kv_heads, capacity, config.head_dim)
    k_pool = torch.randn(shape, device="cuda", dtype=model.dtype) * 0.1
    v_pool = torch.randn_like(k_pool)
    model.transformer.setup_rope(capacity)
    step = BatchedGpuStep(model.transformer, k_pool, v_pool, scratch=slots, graphs=False)
    print("| decoding rows | chunks | host launch ms | device ms |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for rows, count, call in cases(slots, args.prompt, args.context):
            for _ in range(3):
                step.mixed(*call)
            torch.cuda.synchronize()
            host, device = [], []
            for _ in range(10):
                began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                began.record()
                started = time.perf_counter()
                step.mixed(*call)
                host.append(1000 * (time.perf_counter() - started))
                ended.record()
                torch.cuda.synchronize()
                device.append(began.elapsed_time(ended))
            print(
                f"| {rows} | {count} | {statistics.median(host):.1f} |"
                f" {statistics.median(device):.1f} |"
            )
        from torch.profiler import ProfilerActivity, profile

        for rows, count, call in cases(slots, args.prompt, args.context):
            if (rows, count) not in (("0", 4), ("64 (in the 2,048)", 4)):
                continue
            with profile(activities=[ProfilerActivity.CUDA]) as profiled:
                step.mixed(*call)
                torch.cuda.synchronize()
            print(f"\ndevice time by kernel, {rows} decoding rows, {count} chunks:")
            table = profiled.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
            print(table)


if __name__ == "__main__":
    main()
