"""SmolLM2-135M-Instruct on the CPU, in one run: llamachat's engine in each weight format,
transformers' eager `generate` on the same weights (fp32), and llama.cpp (llama-cpp-python) on
the original GGUF when it is installed. Greedy, the same chat prompt, a fixed number of new
tokens.

    python benchmarks/cpu_bench.py MODEL_FOLDER [--gguf FILE.gguf] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamachat.engine import GREEDY, ChatModel  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]
NEW_TOKENS = 128


def ours(folder: Path, quantization: str | None, native: bool = True) -> dict[str, float]:
    """`native` False loads with LLAMACHAT_NATIVE=0: int4 on PyTorch's kernels."""
    saved = os.environ.get("LLAMACHAT_NATIVE")
    os.environ["LLAMACHAT_NATIVE"] = "1" if native else "0"
    model = ChatModel.load(folder, device="cpu", dtype="float32", quantization=quantization)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        ("llamachat, fp32 weights (--quantize none)", ours(args.folder, None)),
        ("llamachat, f16 weights, fp32 arithmetic (the CPU default)", ours(args.folder, "f16")),
        ("llamachat, int8 weights, bf16 activations", ours(args.folder, "int8")),
        ("llamachat, int4 weights, bf16 activations", ours(args.folder, "int4", native=False)),
        ("llamachat, int4 weights, int8 activations, C step", ours(args.folder, "int4")),
        ("transformers eager generate (fp32)", transformers_eager(args.folder)),
    ]
    if args.gguf:
        result = llama_cpp(args.gguf, args.threads)
        rows.append(("llama.cpp (Q4_1 GGUF)", result) if result else ("llama.cpp", None))
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, {args.threads} threads, torch {torch.__version__}")
    print("| engine | decode (tok/s) | time to first token (ms) |\n|---|---|---|")
    for name, result in rows:
        if result is None:
            print(f"| {name} | not installed | - |")
            continue
        label = f"{name} {result.get('version', '')}".strip()
        print(f"| {label} | {result['decode_tokens_per_s']:.1f} | {result['ttft_ms']:.0f} |")


if __name__ == "__main__":
    main()
