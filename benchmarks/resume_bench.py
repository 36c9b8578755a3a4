"""A long conversation's next turn, its KV cache loaded from disk (engine/saved_cache.py)
against prefilled from scratch: the time to the first token of the reply.

    python benchmarks/resume_bench.py --folder MODEL_DIR --tokens 4000 --runs 3
    python benchmarks/resume_bench.py --shape 8b --device cuda --tokens 4000 --runs 3

The conversation is --tokens long: a model's templated turns of filler text, or random token ids
for a shape of random weights. Each run saves the cache of a session that read it, then times
in turn: loading that file into a new session and reading the next turn (64 more tokens) to
its first reply token, and the same in a new session without the file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine import ChatModel, SamplingParams  # noqa: E402
from llamachat.engine.bench import random_model  # noqa: E402
from llamachat.engine.saved_cache import load, save  # noqa: E402
from llamachat.engine.session import GenerationStats  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
IDENTITY = {"benchmark": "resume"}
FILLER = "The river bends past the old mill, where the miller counts his sacks of grain. "


def conversation(model: ChatModel, tokens: int) -> list[int]:
    if model.tokenizer is None:  # random weights: random ids
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, model.config.vocab_size, (tokens,), generator=generator).tolist()
    turns: list[dict[str, str]] = []
    while len(model.prompt_ids(turns or [{"role": "user", "content": ""}])) < tokens:
        turns.append({"role": "user", "content": FILLER * 6})
        turns.append({"role": "assistant", "content": FILLER * 6})
    return model.prompt_ids(turns)


def first_token_ms(session, ids: list[int]) -> tuple[float, int]:
    stats = GenerationStats()
    started = time.perf_counter()
    tokens = session.generate(ids, GREEDY, 1, threading.Event(), stats)
    next(tokens)
    if session.model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = 1000 * (time.perf_counter() - started)
    for _ in tokens:
        pass
    return elapsed, stats.prefilled_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder")
    parser.add_argument("--shape")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.shape:
        model = random_model(args.shape, device=args.device)
    else:
        model = ChatModel.load(args.folder, device=args.device)
    ids = conversation(model, args.tokens)
    ctx = len(ids) + 512
    later = ids + conversation(model, 64)[:64] if model.tokenizer is None else ids + ids[-64:]
    loaded, prefilled, loading, saving = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "conversation.safetensors"
        for _ in range(args.runs):
            session = model.session(ctx)
            first_token_ms(session, ids)
            started = time.perf_counter()
            held = save(session, path, IDENTITY)
            saving.append(1000 * (time.perf_counter() - started))
            resumed = model.session(ctx)
            started = time.perf_counter()
            load(resumed, path, IDENTITY)
            loading.append(1000 * (time.perf_counter() - started))
            ms, fed = first_token_ms(resumed, later)
            loaded.append(ms + loading[-1])
            ms, everything = first_token_ms(model.session(ctx), later)
            prefilled.append(ms)
        size = path.stat().st_size
    print(f"{model.config.n_layers} layers, {held} tokens held, file {size / 2**20:.0f} MiB,"
          f" {model.device} {str(model.dtype).removeprefix('torch.')}")  # fmt: skip
    print("| next turn | time to first token, median (ms) | tokens prefilled |")
    print("|---|---|---|")
    print(f"| cache loaded (the load's {statistics.median(loading):.0f} ms included) |"
          f" {statistics.median(loaded):.0f} | {fed} |")  # fmt: skip
    print(f"| prefilled | {statistics.median(prefilled):.0f} | {everything} |")
    print(f"saving took {statistics.median(saving):.0f} ms (median)")


if __name__ == "__main__":
    main()
