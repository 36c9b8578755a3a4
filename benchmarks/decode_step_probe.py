"""Where a batched decode step's time goes on a GPU (decode/batch.py: BatchedGpuStep), against
its floor: the weights read once and every row's keys and values read once, at the card's copy
bandwidth.

    python benchmarks/decode_step_probe.py --shape 8b --rows 64 --context 700

Prints, each the mean of 20 calls back to back on CUDA events: the whole step (its CUDA
graph) at 1 to --rows rows; each matrix product alone at --rows rows (ms, GB/s of its
weights); the attention kernel alone over one layer's pool with the step's split and with
other block sizes, warps, stages and splits (ms, GB/s of the keys and values read); and the
step's kernels by device time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine.bench import random_model  # noqa: E402
from llamachat.engine.decode.batch import BatchedGpuStep, _attention_chunks  # noqa: E402


def timed(call, runs: int = 20) -> float:
    """Device ms of one `call`: `runs` of them back to back between two CUDA events, after two
    warm-up calls (one call timed alone would count the host's launch of a short kernel)."""
    for _ in range(2):
        call()
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began.record()
    for _ in range(runs):
        call()
    ended.record()
    torch.cuda.synchronize()
    return began.elapsed_time(ended) / runs


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 2 GB (read and written: 4 GB moved)."""
    source = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * 2 / (timed(lambda: target.copy_(source)) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=700)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    model = random_model(args.shape)
    transformer = model.transformer
    config = model.config
    slots, capacity = args.rows + 8, 1024
    shape = (config.n_layers, slots + 1, config.n_kv_heads, capacity, config.head_dim)
    k_pool = torch.randn(shape, device="cuda", dtype=model.dtype) * 0.1
    v_pool = torch.randn_like(k_pool)
    transformer.setup_rope(capacity)
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    weight_bytes -= transformer.tok_embeddings.weight.numel() * 2  # one row of it is read
    kv_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
    step = BatchedGpuStep(transformer, k_pool, v_pool, scratch=slots)

    print("\n| rows | step ms | floor ms | share of the floor |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        rows = 1
        while rows <= args.rows:
            call = ([3] * rows, list(range(rows)), [args.context] * rows)
            ms = timed(lambda call=call: step(*call))
            floor = (weight_bytes + rows * (args.context + 1) * kv_token) / bandwidth * 1000
            print(f"| {rows} | {ms:.3f} | {floor:.3f} | {floor / ms:.0%} |")
            rows *= 2

        rows = args.rows
        layer = transformer.layers[0]
        print(f"\n| product at {rows} rows | ms | GB/s of weights | x32 layers ms |")
        print("|---|---|---|---|")
        products = [
            ("wqkv", layer.attention.wqkv),
            ("wo", layer.attention.wo),
            ("w13", layer.feed_forward.w13),
            ("w2", layer.feed_forward.w2),
            ("output", transformer.output),
        ]
        for name, linear in products:
            x = torch.randn(rows, linear.in_features, device="cuda", dtype=model.dtype)
            ms = timed(lambda x=x, linear=linear: F.linear(x, linear.weight))
            bytes_ = linear.weight.numel() * 2
            times = 1 if name == "output" else config.n_layers
            print(f"| {name} | {ms:.4f} | {bytes_ / ms / 1e6:.0f} | {ms * times:.3f} |")

        attention(config, k_pool, v_pool, rows, args.context)

        from torch.profiler import ProfilerActivity, profile

        eager = BatchedGpuStep(transformer, k_pool, v_pool, scratch=slots, graphs=False)
        call = ([3] * rows, list(range(rows)), [args.context] * rows)
        eager(*call)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            eager(*call)
            torch.cuda.synchronize()
        print(f"\ndevice time by kernel, {rows} rows (launched one by one):")
        print(profiled.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))


def attention(config, k_pool, v_pool, rows: int, context: int) -> None:
    """The attention kernel alone, over layer 0's pool, in its variants."""
    import triton

    from llamachat.engine.kernels.cuda.fused import _attention_chunk_kernel

    kv_heads, head_dim = config.n_kv_heads, config.head_dim
    groups = config.n_heads // kv_heads
    k, v = k_pool[0], v_pool[0]
    q = torch.randn(rows, config.n_heads, head_dim, device="cuda", dtype=k.dtype)
    position = torch.full((rows,), context, device="cuda", dtype=torch.long)
    slots = torch.arange(rows, device="cuda")
    read = rows * (context + 1) * kv_heads * head_dim * 2 * 2
    used = _attention_chunks(rows, kv_heads)
    print(f"\nattention alone, {rows} rows of {context + 1} keys ({read / 1e6:.0f} MB a layer);")
    print(f"the step splits each row's keys in {used}")
    print("| splits | block | warps | stages | ms | GB/s |")
    print("|---|---|---|---|---|---|")
    results = []
    for chunks, block, warps, stages in itertools.product(
        (1, 2, 4), (32, 64, 128), (4, 8), (2, 3, 4)
    ):
        acc = torch.empty((rows, kv_heads, chunks, groups, head_dim), device="cuda")
        best = torch.empty((rows, kv_heads, chunks, groups), device="cuda")
        total = torch.empty_like(best)

        def call(chunks=chunks, block=block, warps=warps, stages=stages, acc=acc, best=best,
                 total=total):  # fmt: skip
            _attention_chunk_kernel[(kv_heads, chunks, rows)](
                q, k, v, position, slots, acc, best, total, k.shape[-2], head_dim**-0.5, chunks,
                kv_heads, groups, max(16, triton.next_power_of_2(groups)), head_dim, block, True,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip

        try:
            ms = timed(call)
        except Exception as error:  # noqa: BLE001 - a variant Triton cannot build
            print(f"| {chunks} | {block} | {warps} | {stages} | failed: {type(error).__name__} |")
            continue
        results.append((ms, chunks, block, warps, stages))
    results.sort()
    for ms, chunks, block, warps, stages in results[:12]:
        print(f"| {chunks} | {block} | {warps} | {stages} | {ms:.4f} | {read / ms / 1e6:.0f} |")
    default = [r for r in results if r[1:] == (used, 64, 4, 3)]
    if default:
        ms = default[0][0]
        print(f"the step's own (splits {used}, block 64, 4 warps, 3 stages): {ms:.4f} ms,"
              f" {read / ms / 1e6:.0f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
