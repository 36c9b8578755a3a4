"""Conversations that share a system prompt through the batch scheduler, as a server sees them
when its clients send the same system prompt (most applications do): each user's first turn,
one user after another, then each user's second turn (its whole conversation sent again, as
every OpenAI client does). Printed per request: its time to first token and the prompt tokens
it reused.

    python benchmarks/shared_prompt_bench.py --folder MODEL_DIR --device cpu
    python benchmarks/shared_prompt_bench.py --folder MODEL_DIR --system-words 400 --users 6

A later user's first turn finds the system prompt in an earlier user's slot; a second turn
finds its own first turn in its own slot, if no other conversation took it over. One JSON line
per request, then a summary line: the median TTFT of the later first turns and of the second
turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamachat.engine import ChatModel  # noqa: E402
from llamachat.engine.batching import BatchRequest, BatchScheduler  # noqa: E402
from llamachat.engine.prompts import PromptFitter  # noqa: E402
from llamachat.engine.sampling import SamplingParams  # noqa: E402

QUESTIONS = [
    "What time is it?", "Where is the harbour?", "Who wrote this?", "Why is it raining?",
    "How far is the moon?", "What should I cook tonight?", "Which way is north?",
    "When does the shop open?",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="a model folder (an installed model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--new", type=int, default=8, help="tokens per reply")
    args = parser.parse_args()
    model = ChatModel.load(Path(args.folder), device=args.device)
    ctx = min(model.context_length, 4096)
    scheduler = BatchScheduler(model, slots=args.users + 1, ctx=ctx, batch=1)
    system = " ".join(["Answer briefly and kindly, as a ship's captain would."] * 40)
    system = " ".join(system.split()[: args.system_words])
    firsts: list[float] = []
    seconds: list[float] = []
    conversations = [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]},
        ]
        for index in range(args.users)
    ]
    try:
        for turn in (1, 2):
            for index, messages in enumerate(conversations):
                if turn == 2:
                    messages.append({"role": "user", "content": "And why is that?"})
                text, measured = ask(scheduler, model, ctx, messages, args.new)
                if turn == 1:
                    messages.append({"role": "assistant", "content": text})
                row = {
                    "user": index,
                    "turn": turn,
                    "prompt_tokens": measured.prompt_tokens,
                    "reused_tokens": measured.reused_tokens,
                    "ttft_ms": round(1000 * measured.time_to_first_token_s, 1),
                }
                print(json.dumps(row), flush=True)
                if turn == 2:
                    seconds.append(measured.time_to_first_token_s)
                elif index:
                    firsts.append(measured.time_to_first_token_s)
    finally:
        scheduler.close()
    print(
        json.dumps(
            {
                "later_first_turns_ttft_p50_ms": _median_ms(firsts),
                "second_turns_ttft_p50_ms": _median_ms(seconds),
            }
        ),
        flush=True,
    )


def ask(scheduler, model, ctx: int, messages, new: int):
    """One greedy reply through the scheduler: its text and its stats."""
    prompt = PromptFitter(model, ctx).fit(messages, new)
    ended = threading.Event()
    pieces: list[str] = []
    stats = []
    scheduler.submit(
        BatchRequest(
            prompt,
            SamplingParams(temperature=0.0),
            model.chat_format.stop,
            pieces.append,
            lambda measured: (stats.append(measured), ended.set()),
        )
    )
    assert ended.wait(600), "a request did not end"
    return "".join(pieces), stats[0]


def _median_ms(values: list[float]) -> float | None:
    return round(1000 * statistics.median(values), 1) if values else None


if __name__ == "__main__":
    main()
