"""Closed-loop clients against the engine's batch scheduler (engine/batching.py), in process: no
HTTP, so it measures what the engine does with many sequences, the ceiling for `llamachat serve`.

    python benchmarks/batch_bench.py --shape 8b --device cuda --clients 1 8 32 64
    python benchmarks/batch_bench.py --shape 1b --device cpu --clients 1 4 --prompt 128 --new 32

Each client sends a prompt of --prompt random token ids, waits for its --new tokens, and sends the
next, --requests times. Printed per concurrency: generated tokens per second over all clients,
time to first token and the gap between tokens (p50 / p99). With --session, first the same
request through a plain session (the one-conversation engine the chat app uses), the figure a
lone client should approach; with --steps, the time of one decode-only step per batch size.
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
from llamachat.engine.decode.batch import PromptChunk  # noqa: E402
from llamachat.engine.prompts import Prompt  # noqa: E402
from llamachat.engine.sampling import SamplingParams  # noqa: E402
from llamachat.engine.session import GenerationStats  # noqa: E402


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


def session_reference(model, prompt: int, new: int, vocab: int) -> dict:
    """One request through a plain session: its decode rate and time to first token."""
    ids = torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    sampling = SamplingParams(temperature=0.0)
    for _ in range(2):  # the first captures the session's graphs
        session = model.session(prompt + new + 64)
        started = time.perf_counter()
        times = []
        tokens = session.generate(ids, sampling, new, threading.Event(), GenerationStats())
        for _token in tokens:
            times.append(time.perf_counter())
    return {
        "session_decode_tok_per_s": (len(times) - 1) / (times[-1] - times[0]),
        "session_ttft_ms": 1000 * (times[0] - started),
    }


def step_times(scheduler: BatchScheduler, sizes: list[int], context: int) -> dict[str, float]:
    """Milliseconds of one decode-only step of each batch size, every sequence at `context`,
    and of steps where a prompt chunk of 512 / 2048 tokens rides along with 0 or the largest
    batch's decoding rows."""
    step = scheduler.device_step
    largest = max(sizes)

    def timed(name: str, run) -> None:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(10):
            run()
        torch.cuda.synchronize()
        times[name] = 1000 * (time.perf_counter() - began) / 10

    times: dict[str, float] = {}
    for size in sizes:
        args = ([1] * size, list(range(size)), [context] * size)
        timed(f"step_ms_at_{size}", lambda args=args: step(*args))
    for rows in (0, largest - 1):
        for length in (512, 2048):
            chunk = [PromptChunk(largest - 1, 0, [1] * min(length, scheduler.ctx))]
            args = ([1] * rows, list(range(rows)), [context] * rows, chunk)
            timed(f"mixed_ms_{rows}_rows_{length}_prompt", lambda args=args: step.mixed(*args))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=2, help="per client")
    parser.add_argument("--prompt", type=int, default=600)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--session", action="store_true", help="measure a plain session first")
    parser.add_argument("--steps", action="store_true", help="time decode-only steps")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[None])
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
    head = {"shape": args.shape, "device": args.device}
    if args.session:
        reference = session_reference(model, args.prompt, args.new, vocab)
        print(json.dumps({**head, **reference}), flush=True)
    if args.steps:
        scheduler = BatchScheduler(model, slots=max(args.clients), ctx=max(ctx, 2048 + 64))
        times = step_times(scheduler, args.clients, args.prompt + args.new // 2)
        scheduler.close()
        print(json.dumps({**head, **times}), flush=True)
    for budget in args.prefill_tokens:
        for clients in args.clients:
            scheduler = BatchScheduler(model, slots=clients, ctx=ctx, prefill_tokens=budget)
            run(scheduler, clients, 1, args.prompt, 8, vocab)  # warm-up (Triton, cuBLAS)
            result = run(scheduler, clients, args.requests, args.prompt, args.new, vocab)
            scheduler.close()
            del scheduler
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(json.dumps({**head, "prefill_tokens": budget, **result}), flush=True)


if __name__ == "__main__":
    main()
