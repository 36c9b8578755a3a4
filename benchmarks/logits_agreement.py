"""Greedy tokens on a GPU in bf16 against the float32 CPU reference, with the LM head's logits
written as float32 (now) and as they were before, rounded to bfloat16 on the way out.

    python benchmarks/logits_agreement.py MODEL_FOLDER [--tokens 32]

Each prompt's greedy answer is made on the CPU in float32 (the reference); then the GPU model
reads the same tokens (teacher forcing: its own mistakes do not carry over) and at every step
we ask whether its best token is the reference's. "before" is the same logits rounded to
bfloat16, exactly what storing the head's float32 sums as bfloat16 did. Where they part, the
reference's gap between its two best logits says how close the call was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine import ChatModel, KVCache  # noqa: E402
from llamachat.engine.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [
    "用一句话解释什么是旋转位置编码。", "What is the capital of France?",
    "Explain why the sky is blue.", "Write a haiku about the sea.",
    "List three uses of a paperclip.", "How does a refrigerator work?",
    "Translate 'good morning' into Spanish.", "What is 17 times 23?",
    "Name a famous painting by Van Gogh.", "Give me a tip for learning to code.",
    "什么是光合作用？", "Describe a cat in two sentences.",
    "Why do leaves change colour in autumn?", "What is a black hole?",
    "Summarise the plot of Romeo and Juliet.", "How do vaccines work?",
    "Write one sentence about the moon.", "What is the boiling point of water?",
    "Suggest a name for a bakery.", "Explain recursion to a child.",
]  # fmt: skip


def reference(model: ChatModel, ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """The greedy continuation on the CPU in float32, and the gap between the two best logits
    at each of its steps."""
    reply = model.session().generate(ids, GREEDY, tokens, _never(), _stats())
    chosen = list(reply)
    logits = _logits(model, ids + chosen)[len(ids) - 1 : len(ids) - 1 + len(chosen)]
    top = logits.topk(2, dim=-1).values
    return chosen, (top[:, 0] - top[:, 1]).tolist()


def _logits(model: ChatModel, ids: list[int]) -> torch.Tensor:
    """Float32 logits (T, V) of every position, each token fed one at a time after the first
    (the decode step, as a reply runs), the prompt's first token alone."""
    transformer = model.transformer
    length = len(ids)
    span = ((length + 255) // 256) * 256
    transformer.setup_rope(span)
    cache = KVCache(model.config, span, model.device, model.dtype)
    rows = []
    with torch.inference_mode():
        for position, token in enumerate(ids):
            tokens = torch.tensor([[token]], device=model.device)
            at = torch.tensor([position], device=model.device)
            rows.append(transformer(tokens, at, cache, span).view(-1).float().cpu())
    return torch.stack(rows)


def _never():
    import threading

    return threading.Event()


def _stats():
    from llamachat.engine.session import GenerationStats

    return GenerationStats()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    cpu = ChatModel.load(args.folder, device="cpu", dtype="float32")
    gpu = ChatModel.load(args.folder, device="cuda", dtype="bfloat16")
    totals = {"steps": 0, "now": 0, "before": 0, "first_now": 0, "first_before": 0}
    for prompt in PROMPTS:
        ids = cpu.prompt_ids([{"role": "user", "content": prompt}])
        chosen, gaps = reference(cpu, ids, args.tokens)
        logits = _logits(gpu, ids + chosen)[len(ids) - 1 : len(ids) - 1 + len(chosen)]
        now = logits.argmax(dim=-1).tolist()
        before = logits.bfloat16().float().argmax(dim=-1).tolist()  # ties: the lowest id
        agree_now = [a == b for a, b in zip(now, chosen, strict=True)]
        agree_before = [a == b for a, b in zip(before, chosen, strict=True)]
        totals["steps"] += len(chosen)
        totals["now"] += sum(agree_now)
        totals["before"] += sum(agree_before)
        totals["first_now"] += agree_now[0]
        totals["first_before"] += agree_before[0]
        parted = [round(gaps[i], 4) for i, ok in enumerate(agree_now) if not ok]
        print(json.dumps({
            "prompt": prompt, "steps": len(chosen), "agree_now": sum(agree_now),
            "agree_before": sum(agree_before), "first_now": agree_now[0],
            "first_before": agree_before[0], "reference_gaps_where_now_parts": parted,
        }, ensure_ascii=False))  # fmt: skip
    print(json.dumps({"prompts": len(PROMPTS), **totals}))


if __name__ == "__main__":
    main()
