"""Closed-loop clients against the engine's batch scheduler (engine/batching.py), in process: no
HTTP, so it measures what the engine does with many sequences, the ceiling for `llamachat serve`.

    python benchmarks/batch_bench.py --shape 8b --device cuda --clients 1 8 32 64
    python benchmarks/batch_bench.py --shape 1b --device cpu --clients 1 4 --prompt 128 --new 32

Each client sends a prompt of --prompt random token ids, waits for its --new tokens, and sends the
next, --requests times. Printed per concurrency: generated tokens per second over all clients,
time to first token and the gap between tokens (p50 / p99).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine.batching import BatchRequest, BatchScheduler  # noqa: E402
from llamachat.engine.bench import random_model  # noqa: E402
from llamachat.engine.prompts import Prompt  # noqa: E402
from llamachat.engine.sampling import SamplingParams  # noqa: E402


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def run(scheduler: BatchScheduler, clients: int, requests: int, prompt: int, new: int, vocab: int):
    ttft: list[float] = []
    gaps: list[float] = []
    generated = [0]
    lock = threading.Lock()
    sampling = SamplingParams(temperature=0.0)

    def client(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        for _ in range(requests):
            ids = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
            times: list[float] = []
            done = threading.Event()
            ended: list = []
            started = time.perf_counter()
            scheduler.submit(
                BatchRequest(
                    Prompt(ids, (), new),
                    sampling,
                    (),
                    lambda _piece, times=times: times.append(time.perf_counter()),
                    lambda stats, done=done, ended=ended: (ended.append(stats), done.set()),
                )
            )
            done.wait()
            with lock:
                generated[0] += ended[0].generated_tokens
                if times:
                    ttft.append(times[0] - started)
                    gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {
        "clients": clients,
        "generated_tok_per_s": generated[0] / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * percentile(gaps, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=2, help="per client")
    parser.add_argument("--prompt", type=int, default=600)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    model = random_model(args.shape, args.device, dtype)
    # Random weights have no tokenizer: the stream's text is one character per token.
    model.decode = lambda ids: "x" * len(ids)  # type: ignore[method-assign]
    ctx = args.prompt + args.new + 64
    vocab = model.config.vocab_size
    for clients in args.clients:
        scheduler = BatchScheduler(model, slots=clients, ctx=ctx)
        run(scheduler, clients, 1, args.prompt, 8, vocab)  # warm-up: captures its graphs
        result = run(
            scheduler, clients, args.requests, args.prompt, args.new, model.config.vocab_size
        )
        scheduler.close()
        del scheduler
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(json.dumps({"shape": args.shape, "device": args.device, **result}), flush=True)


if __name__ == "__main__":
    main()
