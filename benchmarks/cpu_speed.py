"""SmolLM2 on this CPU beside llama.cpp's own llama-bench, in one run: decode and prefill
tokens/s at each thread count.

llama-bench is built from the source vendored in the llama-cpp-python sdist (docs/BENCHMARKS.md
says how) and runs the GGUF the model was pulled from: `-p 512 -n 128`, each thread count, two
repetitions. llamachat runs the same model as installed by `llamachat pull smollm2`, in each
weight format given: decode is a greedy reply of 128 tokens through the engine's session (its
sampling and detokenizing included), prefill a 512-token prompt's first token. Thread counts
are fixed for both (`-t`, `threads=`).

    python benchmarks/cpu_speed.py MODEL_FOLDER --gguf FILE.gguf --llama-bench PATH \
        [--threads 1 2] [--formats int4 f16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamachat.engine import ChatModel, GenerationStats, SamplingParams  # noqa: E402

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]
NEW_TOKENS = 128
PROMPT_TOKENS = 512
# Greedy; the story runs past NEW_TOKENS (each row says how many it decoded; llama-bench's tg128
# decodes 128 whatever comes).
GREEDY = SamplingParams(temperature=0.0)


def llama_bench(binary: Path, gguf: Path, threads: list[int]) -> list[dict]:
    command = [
        str(binary), "-m", str(gguf), "-t", ",".join(map(str, threads)),
        "-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS), "-r", "2", "-o", "json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = []
    for test in json.loads(result.stdout):
        kind = "prefill" if test["n_prompt"] else "decode"
        rows.append({"threads": test["n_threads"], kind: test["avg_ts"]})
    return rows


def ours(folder: Path, weight_format: str, threads: int) -> dict[str, float]:
    model = ChatModel.load(folder, device="cpu", quantization=weight_format, threads=threads)
    decode, tokens = [], 0
    for _ in range(3):
        reply = model.session().reply(STORY, GREEDY, max_new_tokens=NEW_TOKENS)
        list(reply)
        decode.append(reply.stats.decode_tokens_per_s)
        tokens = reply.stats.generated_tokens
    # A prompt of PROMPT_TOKENS: one word repeated, read to its first token.
    ids = model.prompt_ids([{"role": "user", "content": " ".join(["dragon"] * PROMPT_TOKENS)}])
    ids = ids[:PROMPT_TOKENS]
    prefill = []
    for _ in range(2):
        stats = GenerationStats()
        started = time.perf_counter()
        list(model.session().generate(ids, GREEDY, 1, threading.Event(), stats))
        prefill.append(PROMPT_TOKENS / (time.perf_counter() - started))
    return {
        "threads": model.threads,
        "decode": statistics.median(decode),
        "decoded_tokens": tokens,
        "prefill": statistics.median(prefill),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--llama-bench", type=Path, required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["int4", "f16"])
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    for row in llama_bench(args.llama_bench, args.gguf, args.threads):
        print(json.dumps({"engine": "llama.cpp (llama-bench), Q4_1 GGUF", **row}))
    for weight_format in args.formats:
        for threads in args.threads:
            row = ours(args.folder, weight_format, threads)
            print(json.dumps({"engine": f"llamachat, {weight_format}", **row}))


if __name__ == "__main__":
    main()
