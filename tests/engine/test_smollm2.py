"""The real model, SmolLM2-135M-Instruct (9 heads over 3 kv heads, 30 layers, ChatML), against
transformers' own reading of the same GGUF. fp32 on the CPU; never skipped."""

from __future__ import annotations

import pytest
import torch

from llamachat.engine import GREEDY
from llamachat.engine.detokenize import StreamDecoder

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "What is the capital of France?",
    "请用三句话介绍一下长城。",
    "Write a haiku about the sea.",
]
NEW_TOKENS = 48


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_prompt_ids_match_the_tokenizers_own_chat_template(smollm2):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2.folder)
    for prompt in PROMPTS:
        expected = reference.apply_chat_template(
            chat(prompt), add_generation_prompt=True, tokenize=True
        )
        if not isinstance(expected, list):  # transformers ≥ 5 returns a BatchEncoding
            expected = expected["input_ids"]
        assert smollm2.prompt_ids(chat(prompt)) == list(expected)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_is_token_identical_to_transformers_generate(
    smollm2, smollm2_reference, prompt
):
    prompt_ids = smollm2.prompt_ids(chat(prompt))
    with torch.no_grad():
        output = smollm2_reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    expected = output[0, len(prompt_ids) :].tolist()
    reply = smollm2.session().reply(chat(prompt), GREEDY, max_new_tokens=NEW_TOKENS)
    text = "".join(reply)
    assert reply.stats.generated_tokens == len(expected)
    if reply.stats.finish_reason == "stop":  # both ended on an end-of-sequence id
        assert expected[-1] in smollm2.eos_token_ids
        expected = expected[:-1]
    else:
        assert reply.stats.finish_reason == "length" and len(expected) == NEW_TOKENS
    assert reply.token_ids == expected
    assert text == smollm2.decode(reply.token_ids)


def test_chinese_and_emoji_stream_intact(smollm2):
    text = "长城是中国古代的军事防御工程🏯，全长两万多公里。Emoji: 🚀🙂👍🏽 café"
    ids = smollm2.encode(text)
    # The test means something only if some characters really span several tokens.
    assert any("\ufffd" in smollm2.decode([token]) for token in ids)
    decoder = StreamDecoder(smollm2.decode)
    pieces = [decoder.push(token) for token in ids] + [decoder.finish()]
    assert (
        "".join(pieces).encode("utf-8")
        == smollm2.decode(ids).encode("utf-8")
        == text.encode("utf-8")
    )
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_stop_string_spanning_two_tokens_never_appears(smollm2):
    messages = chat(PROMPTS[0])
    free = smollm2.session().reply(messages, GREEDY, max_new_tokens=NEW_TOKENS)
    list(free)
    # Two characters from the end of one multi-character token and two from the start of the next.
    ends, position = [], 0
    for token in free.token_ids:
        piece = smollm2.decode([token])
        ends.append((position, position + len(piece)))
        position += len(piece)
    assert smollm2.decode(free.token_ids) == free.text
    _, boundary = next(
        (a, b)
        for (a, b), (c, d) in zip(ends[2:], ends[3:], strict=False)
        if b - a >= 3 and d - c >= 3
    )
    stop = free.text[boundary - 2 : boundary + 2]
    stopped = smollm2.session().reply(messages, GREEDY, max_new_tokens=NEW_TOKENS, stop=[stop])
    pieces = list(stopped)
    assert stop not in "".join(pieces)
    assert "".join(pieces) == free.text[: free.text.index(stop)]
    assert stopped.stats.finish_reason == "stop"


def test_second_turn_reuses_the_cache_and_matches_a_fresh_session(smollm2):
    session = smollm2.session()
    first = chat(PROMPTS[0])
    reply1 = session.reply(first, GREEDY, max_new_tokens=24)
    list(reply1)
    second = [*first, {"role": "assistant", "content": reply1.text}, *chat("And of Germany?")]
    reply2 = session.reply(second, GREEDY, max_new_tokens=24)
    list(reply2)
    assert reply2.stats.reused_tokens >= reply1.stats.prompt_tokens + len(reply1.token_ids) - 1
    assert reply2.stats.prefilled_tokens < 20
    fresh = smollm2.session().reply(second, GREEDY, max_new_tokens=24)
    list(fresh)
    assert fresh.stats.reused_tokens == 0
    assert reply2.token_ids == fresh.token_ids
