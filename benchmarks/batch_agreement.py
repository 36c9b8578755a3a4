"""Greedy answers served together against the same requests served alone: how many are
token-identical, and where the others part, how close the two best tokens were there.

    python benchmarks/batch_agreement.py --shape 8b --requests 16       # random weights
    python benchmarks/batch_agreement.py --folder MODEL_DIR --requests 16  # an installed model

All requests go to the batch scheduler at once (their prompts prefilled in shared steps, then
decoded together); each is then run alone through a plain session, the one-conversation engine.
In bf16 the batch's matrix products round differently from the lone session's one-row kernels,
so where the lone run's two best tokens are nearly tied the answers can part. One JSON line per
request, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine import ChatModel  # noqa: E402
from llamachat.engine.batching import BatchRequest, BatchScheduler  # noqa: E402
from llamachat.engine.bench import random_model  # noqa: E402
from llamachat.engine.prompts import Prompt, PromptFitter  # noqa: E402
from llamachat.engine.sampling import SampledLogprob, SamplingParams  # noqa: E402
from llamachat.engine.session import GenerationStats  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
TOPICS = [
    "the history of the printing press", "how a refrigerator works", "why the sky is blue",
    "the rules of chess", "photosynthesis", "the French revolution", "how vaccines work",
    "black holes", "the water cycle", "how to bake bread", "the stock market", "volcanoes",
    "the Roman empire", "machine learning", "how airplanes fly", "the human heart",
]  # fmt: skip


def prompts(
    model: ChatModel, count: int, length: int, ctx: int, new: int, random: bool
) -> list[Prompt]:
    if random:  # random weights: random token ids
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        return [
            Prompt(torch.randint(0, vocab, (length,), generator=generator).tolist(), (), new)
            for _ in range(count)
        ]
    fitter = PromptFitter(model, ctx)
    return [
        fitter.fit([{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} ({i})."}], new)
        for i in range(count)
    ]


def batched(model: ChatModel, asked: list[Prompt], ctx: int) -> list[list[SampledLogprob]]:
    scheduler = BatchScheduler(model, slots=len(asked), ctx=ctx)
    runs: list[list[SampledLogprob]] = [[] for _ in asked]
    ended = [threading.Event() for _ in asked]
    for prompt, run, done in zip(asked, runs, ended, strict=True):
        scheduler.submit(
            BatchRequest(
                prompt, GREEDY, (), lambda _piece: None, lambda _stats, d=done: d.set(),
                top_logprobs=2, on_logprob=run.append,
            )
        )  # fmt: skip
    for done in ended:
        done.wait()
    scheduler.close()
    return runs


def alone(model: ChatModel, prompt: Prompt, ctx: int) -> list[SampledLogprob]:
    kept: list[SampledLogprob] = []
    session = model.session(ctx)
    tokens = session.generate(
        prompt.token_ids, GREEDY, prompt.max_new_tokens, threading.Event(), GenerationStats(),
        logprobs=(kept, 2),
    )  # fmt: skip
    for _token in tokens:
        pass
    return kept


def main() -> None:
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape")
    source.add_argument("--folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=600, help="random prompts' length")
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.shape:
        model = random_model(args.shape, args.device, dtype)
        model.decode = lambda ids: "x" * len(ids)  # type: ignore[method-assign]
    else:
        model = ChatModel.load(args.folder, device=args.device, dtype=args.dtype)
    ctx = args.prompt + args.new + 64 if args.shape else 1024
    asked = prompts(model, args.requests, args.prompt, ctx, args.new, bool(args.shape))
    together = batched(model, asked, ctx)
    identical, gaps = 0, []
    for index, (prompt, run) in enumerate(zip(asked, together, strict=True)):
        lone = alone(model, prompt, ctx)
        ids, lone_ids = [p.token_id for p in run], [p.token_id for p in lone]
        parted = next(
            (i for i, (a, b) in enumerate(zip(ids, lone_ids, strict=False)) if a != b), None
        )
        if parted is None and len(ids) == len(lone_ids):
            identical += 1
            print(json.dumps({"request": index, "identical": True, "tokens": len(ids)}))
            continue
        at = parted if parted is not None else min(len(ids), len(lone_ids))
        top = lone[at].top if at < len(lone) else ()
        gap = top[0][1] - top[1][1] if len(top) == 2 else None
        gaps.append(gap)
        print(json.dumps({"request": index, "identical": False, "parted_at": at, "gap": gap}))
    source = args.shape or Path(args.folder).name
    summary = {"model": source, "dtype": args.dtype, "identical": identical}
    print(json.dumps({**summary, "requests": len(asked), "gaps_where_parted": gaps}), flush=True)


if __name__ == "__main__":
    main()
