"""Chat sessions: prefix reuse across turns, rollback, context fitting, stopping."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from llamachat.engine import GREEDY, ContextOverflowError, SamplingParams

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def run(session, messages, **options):
    reply = session.reply(messages, **{"sampling": GREEDY, "max_new_tokens": 12, **options})
    pieces = list(reply)
    assert "".join(pieces) == reply.text
    return reply


def common_prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


def test_second_turn_prefills_only_what_follows_the_cached_prefix(tiny_model):
    session = tiny_model.session()
    first = [SYSTEM, user("Hello, world!")]
    reply1 = run(session, first)
    assert reply1.stats.reused_tokens == 0
    assert (
        reply1.stats.prefilled_tokens
        == reply1.stats.prompt_tokens
        == len(tiny_model.prompt_ids(first))
    )

    second = [*first, assistant(reply1.text), user("What is the capital of France?")]
    reply2 = run(session, second)
    prompt2 = tiny_model.prompt_ids(second)
    cached = tiny_model.prompt_ids(first) + reply1.token_ids
    assert reply2.stats.prompt_tokens == len(prompt2)
    assert reply2.stats.reused_tokens == common_prefix(cached, prompt2)
    assert reply2.stats.reused_tokens >= len(tiny_model.prompt_ids(first))
    assert reply2.stats.prefilled_tokens == len(prompt2) - reply2.stats.reused_tokens

    fresh = run(tiny_model.session(), second)
    assert reply2.token_ids == fresh.token_ids


def test_regenerate_rolls_back_to_the_prompt_and_repeats_greedy_output(tiny_model):
    session = tiny_model.session()
    messages = [user("Once upon a time")]
    first = run(session, messages)
    again = run(session, messages)
    assert again.stats.reused_tokens == again.stats.prompt_tokens - 1  # the last one gives logits
    assert again.stats.prefilled_tokens == 1
    assert again.token_ids == first.token_ids


def test_edited_turn_rolls_back_to_the_common_prefix(tiny_model):
    session = tiny_model.session()
    history = [SYSTEM, user("Hello!"), assistant("Hi there."), user("Tell me about the fox.")]
    run(session, history)
    edited = [*history[:-1], user("Tell me about the dog.")]
    reply = run(session, edited)
    expected_reuse = common_prefix(tiny_model.prompt_ids(history), tiny_model.prompt_ids(edited))
    assert reply.stats.reused_tokens == expected_reuse
    assert 0 < expected_reuse < reply.stats.prompt_tokens
    assert reply.token_ids == run(tiny_model.session(), edited).token_ids


def test_switching_conversations_reuses_only_what_is_shared(tiny_model):
    session = tiny_model.session()
    run(session, [user("The quick brown fox")])
    other = [SYSTEM, user("Paris is the capital")]
    reply = run(session, other)
    assert reply.stats.reused_tokens == common_prefix(
        tiny_model.prompt_ids([user("The quick brown fox")]), tiny_model.prompt_ids(other)
    )
    assert reply.token_ids == run(tiny_model.session(), other).token_ids


def long_conversation(turns: int) -> list[dict[str, str]]:
    messages = [SYSTEM]
    for turn in range(turns):
        messages += [
            user(f"Question {turn}: the quick brown fox?"),
            assistant(f"Answer {turn}: the lazy dog."),
        ]
    return [*messages, user("And the last question?")]


def test_oldest_turns_are_dropped_to_fit_and_the_system_prompt_is_kept(tiny_model):
    session = tiny_model.session(ctx=160)
    messages = long_conversation(12)
    assert len(tiny_model.prompt_ids(messages)) > 160
    reply = run(session, messages, max_new_tokens=16)
    assert reply.dropped, "some turns must have been left out"
    assert reply.dropped[0] == 1 and list(reply.dropped) == list(range(1, 1 + len(reply.dropped)))
    kept = [messages[0], *messages[1 + len(reply.dropped) :]]
    assert kept[1]["role"] == "user"
    assert reply.stats.prompt_tokens == len(tiny_model.prompt_ids(kept))
    assert reply.stats.prompt_tokens + 16 <= 160
    # Dropping one more exchange than needed would also fit; dropping one fewer would not.
    one_fewer = [messages[0], *messages[len(reply.dropped) - 1 :]]
    assert len(tiny_model.prompt_ids(one_fewer)) + 16 > 160
    assert reply.token_ids == run(tiny_model.session(ctx=160), kept, max_new_tokens=16).token_ids


def test_a_message_larger_than_the_context_is_a_clear_error(tiny_model):
    session = tiny_model.session(ctx=64)
    with pytest.raises(ContextOverflowError, match="context of 64"):
        session.reply([SYSTEM, user("the quick brown fox " * 40)])


def test_reply_stops_where_the_context_is_full(tiny_model):
    session = tiny_model.session(ctx=48)
    messages = [user("Hello")]
    prompt = len(tiny_model.prompt_ids(messages))
    reply = session.reply(messages, GREEDY, max_new_tokens=None)
    list(reply)
    if reply.stats.finish_reason != "stop":
        assert reply.stats.finish_reason == "context"
        assert reply.stats.generated_tokens == 48 - prompt


def test_max_new_tokens_ends_the_reply(tiny_model):
    reply = run(tiny_model.session(), [user("Count")], max_new_tokens=5)
    assert reply.stats.generated_tokens == 5 or reply.stats.finish_reason == "stop"
    if reply.stats.finish_reason != "stop":
        assert reply.stats.finish_reason == "length"
        assert len(reply.token_ids) == 5


def test_cancel_keeps_what_was_produced(tiny_model):
    cancel = threading.Event()
    reply = tiny_model.session().reply([user("Hello")], GREEDY, max_new_tokens=40, cancel=cancel)
    for _ in reply:
        cancel.set()
    assert reply.stats.finish_reason == "cancelled"
    assert 1 <= reply.stats.generated_tokens <= 3
    full = run(tiny_model.session(), [user("Hello")], max_new_tokens=40)
    assert full.token_ids[: len(reply.token_ids)] == reply.token_ids
    assert full.text.startswith(reply.text)


def test_cancelled_session_goes_on_consistently(tiny_model):
    session = tiny_model.session()
    cancel = threading.Event()
    cancelled = session.reply([user("Hello")], GREEDY, max_new_tokens=40, cancel=cancel)
    for _ in cancelled:
        cancel.set()
    follow_up = [user("Hello"), assistant(cancelled.text), user("Go on")]
    assert run(session, follow_up).token_ids == run(tiny_model.session(), follow_up).token_ids


def test_same_seed_same_output_and_other_seeds_differ(tiny_model):
    def sampled(seed):
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return run(
            tiny_model.session(), [user("Hello")], sampling=params, max_new_tokens=20
        ).token_ids

    assert sampled(7) == sampled(7)
    assert len({tuple(sampled(seed)) for seed in range(5)}) > 1


def test_reply_can_be_streamed_only_once(tiny_model):
    reply = run(tiny_model.session(), [user("Hello")])
    with pytest.raises(RuntimeError):
        list(reply)


def test_stats_report_timings(tiny_model):
    reply = run(tiny_model.session(), [user("Hello")], max_new_tokens=8)
    assert reply.stats.time_to_first_token_s > 0
    if reply.stats.generated_tokens > 1:
        assert reply.stats.decode_tokens_per_s > 0


def test_greedy_matches_transformers_generate_through_chunked_prefill(tiny_model_factory):
    """A prompt longer than one prefill chunk and several attention buckets."""
    from llamachat.engine import ChatModel

    folder, reference = tiny_model_factory()
    model = ChatModel.load(folder, device="cpu")
    messages = [user("the quick brown fox jumps over the lazy dog " * 30)]
    prompt = model.prompt_ids(messages)
    assert len(prompt) > 600
    reply = run(model.session(), messages, max_new_tokens=20)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    generated = expected[0, len(prompt) :].tolist()
    if reply.stats.finish_reason == "stop":  # our reply ended at an end-of-sequence id
        assert generated[len(reply.token_ids)] in model.eos_token_ids
        generated = generated[: len(reply.token_ids)]
    assert reply.token_ids == generated


def test_every_eos_id_in_generation_config_ends_the_reply(tiny_model_factory, tmp_path):
    """Llama-3 lists several end ids (end of text, end of turn); any of them must stop."""
    import json
    import shutil

    from llamachat.engine import ChatModel

    folder, _ = tiny_model_factory()
    free = run(ChatModel.load(folder, device="cpu").session(), [user("Hello")], max_new_tokens=12)
    assert free.stats.finish_reason == "length"
    ender = free.token_ids[4]
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, ender]}))
    model = ChatModel.load(copy, device="cpu")
    assert {2, ender} <= model.eos_token_ids
    reply = run(model.session(), [user("Hello")], max_new_tokens=12)
    assert reply.stats.finish_reason == "stop"
    assert reply.token_ids == free.token_ids[: free.token_ids.index(ender)]
