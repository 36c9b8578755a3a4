"""One run on a GPU: the card's copy bandwidth, llamachat's engine (CUDA graphs, and eager), and
transformers' `generate` on the same model shapes, written as a Markdown table.

    python benchmarks/gpu_bench.py --shapes 8b,7b --out benchmarks.md

Weights are random (speed does not depend on their values) and made on the GPU: no download.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamachat.engine.bench import SHAPES, BenchResult, copy_bandwidth, measure, random_model  # noqa: E402

GB = 1e9


def transformers_generate(shape: str, prompt: int = 512, new_tokens: int = 64) -> dict[str, float]:
    """transformers' own LlamaForCausalLM.generate, greedy, bf16, on the same shape."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, config.vocab_size, (1, prompt), device="cuda")

    def run(generator: LlamaForCausalLM, tokens: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        generator.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(model, 4)  # warm up
    first = statistics.median(run(model, 1) for _ in range(3))
    whole = statistics.median(run(model, new_tokens) for _ in range(2))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "version": transformers.__version__,
        "ttft_ms": first * 1000,
        "prefill_tokens_per_s": prompt / first,
        "decode_tokens_per_s": (new_tokens - 1) / (whole - first),
    }


def table(bandwidth: float, rows: list[tuple[str, BenchResult]], peers: dict[str, dict]) -> str:
    contexts = sorted({c for _, r in rows for c in r.decode_tokens_per_s})
    header = ["engine", "shape", "prefill 512 (tok/s)", "prefill ~4000 (tok/s, tokens)"]
    header += [f"decode @{c} (tok/s, % of BW)" for c in contexts]
    header += ["TTFT 64-token turn after 4000: reused / full (ms)", "peak GPU memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for engine, r in rows:
        cells = [engine, r.name]
        prefills = sorted(r.prefill_tokens_per_s)  # 512, and ~4000 (less for a 4k-context model)
        cells.append(f"{r.prefill_tokens_per_s[512]:,.0f}" if 512 in prefills else "-")
        long = [n for n in prefills if n > 512]
        cells.append(f"{r.prefill_tokens_per_s[long[0]]:,.0f} ({long[0]})" if long else "-")
        for c in contexts:
            if c in r.decode_tokens_per_s:
                cells.append(
                    f"{r.decode_tokens_per_s[c]:.1f} ({100 * r.bandwidth_share(c, bandwidth):.0f}%)"
                )
            else:
                cells.append("-")
        cells.append(f"{r.ttft_new_turn_reused_ms:.1f} / {r.ttft_new_turn_full_ms:.1f}")
        cells.append(f"{r.peak_memory_bytes / GB:.1f} GB")
        lines.append("| " + " | ".join(cells) + " |")
    for shape, peer in peers.items():
        cells = [
            f"transformers {peer['version']} generate",
            shape,
            f"{peer['prefill_tokens_per_s']:,.0f}",
            "-",
        ]
        cells += [f"{peer['decode_tokens_per_s']:.1f} (prompt 512)"] + ["-"] * (len(contexts) - 1)
        cells += [f"- / {peer['ttft_ms']:.1f} (512-token prompt)", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="8b,7b")
    parser.add_argument("--contexts", default="256,4096,32768")
    parser.add_argument("--out", type=Path, default=Path("benchmarks.md"))
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument(
        "--quantize", default="none,int8,int4", help="weight formats to run: none, int8, int4"
    )
    args = parser.parse_args()

    name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows: list[tuple[str, BenchResult]] = []
    peers: dict[str, dict] = {}
    for shape in args.shapes.split(","):
        for quantization in args.quantize.split(","):
            quantization = None if quantization == "none" else quantization
            model = random_model(shape, quantization=quantization)
            limit = model.context_length
            contexts = tuple(c for c in map(int, args.contexts.split(",")) if c + 200 <= limit)
            result = measure(
                model,
                shape,
                contexts=contexts,
                prefills=(512, min(4000, limit - 400)),
                history=min(4000, limit - 200),
                cuda_graphs=True,
            )
            weights = quantization or "bf16"
            rows.append((f"llamachat {weights}, CUDA graphs", result))
            print(json.dumps(asdict(result)), flush=True)
            if quantization is None and not args.skip_eager:
                eager = measure(
                    model,
                    shape,
                    contexts=contexts[:2],
                    prefills=(512,),
                    decode_steps=32,
                    history=min(4000, limit - 200),
                    cuda_graphs=False,
                )
                rows.append(("llamachat bf16, eager", eager))
                print(json.dumps(asdict(eager)), flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
        if not args.skip_transformers:
            peers[shape] = transformers_generate(shape)
            print(json.dumps(peers[shape]), flush=True)

    stamp = datetime.date.today().isoformat()
    report = (
        f"**{name}**, torch {torch.__version__}, Python {platform.python_version()}, {stamp}. "
        f"Device copy bandwidth {bandwidth / 1e12:.2f} TB/s (bytes read + written); "
        "% of BW = decode tok/s × (weight bytes + KV bytes at that context) / copy bandwidth. "
        "Random weights (made in bf16, then quantised for the int8/int4 rows), "
        "batch 1, greedy.\n\n" + table(bandwidth, rows, peers) + "\n"
    )
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
