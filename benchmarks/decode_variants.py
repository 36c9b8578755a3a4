"""One-token decode on a GPU under the kernel choices that the environment switches
(quantize.py: LLAMACHAT_INT8_DP4A, kernels/cuda/launch.py: LLAMACHAT_PDL), each variant in a
process of its own since the switches are read at import: graphed decode tok/s at --context
for each format, as a share of the floor (bytes a token reads ÷ the measured copy bandwidth),
and with --profile the device time of the step's kernels by name (launched serially, PDL off,
so that each kernel's time is its own).

    python benchmarks/decode_variants.py --shape 8b --formats none,int8,int4,fp8

Variants: `float` (one-row int8 products multiply the activations in float), `dp4a` (on the
row rounded to int8 in groups of 32, four products an instruction; the default); with
--profile also `serial` (dp4a with programmatic dependent launch off, for the kernel times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {"float": {"LLAMACHAT_INT8_DP4A": "0"}, "dp4a": {"LLAMACHAT_INT8_DP4A": "1"}}


def child(shape: str, formats: list[str], context: int, steps: int, profile: bool) -> None:
    import torch

    from llamachat.engine.bench import copy_bandwidth, random_model
    from llamachat.engine.quantize import weight_bytes

    bandwidth = copy_bandwidth()
    for form in formats:
        model = random_model(shape, quantization=None if form == "none" else form)
        session = model.session(ctx=context + 4 * steps + 16)
        tokens = torch.randint(0, model.config.vocab_size, (context + 4 * steps + 8,)).tolist()
        per_token = weight_bytes(model.transformer) + model.kv_bytes_per_token * context
        with torch.inference_mode():
            session._forward(tokens[:context])
            for step in range(8):  # the graph for this span captured, the kernels compiled
                session._forward([tokens[context + step]])
            runs = []
            for _ in range(3):
                del session.cached_ids[context:]
                torch.cuda.synchronize()
                began, ended = torch.cuda.Event(True), torch.cuda.Event(True)
                began.record()
                for step in range(steps):
                    logits = session._forward([tokens[context + step]])
                ended.record()
                torch.cuda.synchronize()
                runs.append(began.elapsed_time(ended) / steps)
            ms = statistics.median(runs)
            row = {
                "format": form, "step_ms": round(ms, 4), "tok_s": round(1000 / ms, 1),
                "floor_ms": round(per_token / bandwidth * 1000, 4),
                "share": round(per_token / bandwidth * 1000 / ms, 3),
            }  # fmt: skip
            if profile:
                eager = model.session(ctx=context + 4 * steps + 16, cuda_graphs=False)
                eager._forward(tokens[:context])
                row["kernels_us"] = kernel_times(eager, tokens, context)
                del eager
        print(json.dumps(row), flush=True)
        del session, model, logits
        torch.cuda.empty_cache()


def kernel_times(session, tokens: list[int], context: int, steps: int = 10) -> dict[str, float]:
    """Device µs a step of each kernel name, over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    del session.cached_ids[context:]
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for step in range(steps):
            session._forward([tokens[context + step]])
    totals: dict[str, float] = {}
    for event in trace.key_averages():
        if event.device_type.name == "CUDA":
            totals[event.key[:60]] = round(event.device_time_total / steps, 1)
    return dict(sorted(totals.items(), key=lambda pair: -pair[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--formats", default="none,int8,int4,fp8")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="also kernel times, PDL off")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    formats = args.formats.split(",")
    if args.child:
        child(args.shape, formats, args.context, args.steps, args.profile)
        return
    runs = [(name, VARIANTS[name], False) for name in args.variants.split(",")]
    if args.profile:
        runs.append(("serial", {"LLAMACHAT_PDL": "0"}, True))
    table = []
    for name, switches, profile in runs:
        command = [
            sys.executable, __file__, "--child", "--shape", args.shape, "--formats",
            args.formats, "--context", str(args.context), "--steps", str(args.steps),
        ]  # fmt: skip
        if profile:
            command.append("--profile")
        done = subprocess.run(
            command, env={**os.environ, **switches}, capture_output=True, text=True
        )
        print(f"## {name} (exit {done.returncode})\n{done.stdout}{done.stderr[-2000:]}", flush=True)
        for line in done.stdout.splitlines():
            row = json.loads(line)
            table.append((name, row))
    print("\n| variant | format | step ms | floor ms | tok/s | share of floor |")
    print("|---|---|---|---|---|---|")
    for name, row in table:
        print(f"| {name} | {row['format']} | {row['step_ms']} | {row['floor_ms']} | "
              f"{row['tok_s']} | {row['share']:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
