"""SmolLM2-135M-Instruct on the CPU, in one run: llamachat's engine in each weight format,
transformers' eager `generate` on the same weights (fp32), and llama.cpp (llama-cpp-python) on
the original GGUF when it is installed. Greedy, the same chat prompt, a fixed number of new
tokens. `--busy N` runs N busy-looping processes beside it (a compile, a browser tab) and adds
rows for the default format at each thread count, where llamachat's default thread count is
meant to hold up.

    python benchmarks/cpu_bench.py MODEL_FOLDER [--gguf FILE.gguf] [--threads 2] [--busy 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamachat.engine import GREEDY, ChatModel  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]
NEW_TOKENS = 128


def ours(
    folder: Path, quantization: str | None, threads: int | None, native: bool = True
) -> dict[str, float]:
    """`native` False loads with LLAMACHAT_NATIVE=0: int4 on PyTorch's kernels. `threads` None:
    llamachat's default."""
    saved = os.environ.get("LLAMACHAT_NATIVE")
    os.environ["LLAMACHAT_NATIVE"] = "1" if native else "0"
    model = ChatModel.load(
        folder, device="cpu", dtype="float32", quantization=quantization, threads=threads
    )
    if saved is None:
        del os.environ["LLAMACHAT_NATIVE"]
    else:
        os.environ["LLAMACHAT_NATIVE"] = saved
    runs = []
    for _ in range(3):
        reply = model.session().reply(PROMPT, GREEDY, max_new_tokens=NEW_TOKENS)
        list(reply)
        runs.append(reply.stats)
    return {
        "decode_tokens_per_s": statistics.median(s.decode_tokens_per_s for s in runs),
        "ttft_ms": statistics.median(s.time_to_first_token_s for s in runs) * 1000,
        "tokens": runs[0].generated_tokens,
        "threads": model.threads,
    }


def transformers_eager(folder: Path) -> dict[str, float]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids

    def run(tokens: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - started

    run(2)
    first = statistics.median(run(1) for _ in range(3))
    whole = statistics.median(run(NEW_TOKENS) for _ in range(2))
    return {
        "version": transformers.__version__,
        "decode_tokens_per_s": (NEW_TOKENS - 1) / (whole - first),
        "ttft_ms": first * 1000,
    }


def llama_cpp(gguf: Path, threads: int) -> dict[str, float] | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    # On this kind of machine llama.cpp's batched prompt evaluation crashed; n_batch=1 works.
    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=threads, n_batch=1, verbose=False)
    runs = []
    for _ in range(2):
        started = time.perf_counter()
        first = None
        count = 0
        for _ in llm.create_chat_completion(
            PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, stream=True
        ):
            count += 1
            if first is None:
                first = time.perf_counter()
        runs.append(((count - 1) / (time.perf_counter() - first), (first - started) * 1000))
    return {
        "version": llama_cpp.__version__,
        "decode_tokens_per_s": statistics.median(r[0] for r in runs),
        "ttft_ms": statistics.median(r[1] for r in runs),
    }


@contextlib.contextmanager
def busy_neighbours(count: int) -> Iterator[None]:
    """`count` other processes that each keep a core busy while the block runs."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if loops else 0)
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument(
        "--threads", type=int, default=None, help="[default: llamachat's, for every row]"
    )
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside the runs")
    args = parser.parse_args()
    threads, folder = args.threads, args.folder
    with busy_neighbours(args.busy):
        rows = [
            ("llamachat, fp32 weights (--quantize none)", ours(folder, None, threads)),
            (
                "llamachat, f16 weights, fp32 arithmetic (the CPU default)",
                ours(folder, "f16", threads),
            ),
            ("llamachat, int8 weights, bf16 activations", ours(folder, "int8", threads)),
            (
                "llamachat, int4 weights, bf16 activations",
                ours(folder, "int4", threads, native=False),
            ),
            ("llamachat, int4 weights, int8 activations, C step", ours(folder, "int4", threads)),
        ]
        if args.busy:  # the default format at fixed counts, beside the default's own choice
            for count in sorted({1, os.cpu_count() or 1}):
                rows.append(
                    (f"llamachat default format, --threads {count}", ours(folder, "f16", count))
                )
        peers = threads or rows[1][1]["threads"]
        torch.set_num_threads(peers)
        rows.append(("transformers eager generate (fp32)", transformers_eager(folder)))
        if args.gguf:
            result = llama_cpp(args.gguf, peers)
            rows.append(("llama.cpp (Q4_1 GGUF)", result) if result else ("llama.cpp", None))
    cpu = platform.processor() or platform.machine()
    busy = f", {args.busy} busy neighbours" if args.busy else ""
    chosen = f"--threads {threads}" if threads else "llamachat's default threads"
    print(f"{cpu}, {os.cpu_count()} CPUs, {chosen}{busy}, torch {torch.__version__}")
    print("| engine | threads | decode (tok/s) | time to first token (ms) |\n|---|---|---|---|")
    for name, result in rows:
        if result is None:
            print(f"| {name} | - | not installed | - |")
            continue
        label = f"{name} {result.get('version', '')}".strip()
        used = result.get("threads", peers)
        rate, ttft = result["decode_tokens_per_s"], result["ttft_ms"]
        print(f"| {label} | {used} | {rate:.1f} | {ttft:.0f} |")


if __name__ == "__main__":
    main()
