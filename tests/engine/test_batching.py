"""The batch scheduler: many sequences per step, each answer the one it gets alone (from a
plain session), prompts reused across requests, long prompts prefilled between decode steps,
cancelled sequences gone at once."""

from __future__ import annotations

import threading

import pytest

from llamachat.engine import ChatModel, SamplingParams
from llamachat.engine.batching import BatchRequest, BatchScheduler
from llamachat.engine.prompts import PromptFitter

CTX = 4096
GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.1)
QUESTIONS = [
    "hello there",
    "what is the capital of France?",
    "天气很好",
    "def main():",
    "once upon a time",
    "How are you today?",
]


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> ChatModel:
    folder, _ = tiny_model_factory(max_position_embeddings=CTX)
    return ChatModel.load(folder, device="cpu")  # the CPU default: f16 weights


# Run ahead: each decode step launched before the last one's tokens are handed out (a GPU's
# default), tested here on the CPU where it changes nothing but the order of the work.
@pytest.fixture(scope="module", params=[False, True], ids=["in-turn", "run-ahead"])
def scheduler(model, request):
    scheduler = BatchScheduler(model, slots=4, ctx=CTX, run_ahead=request.param)
    yield scheduler
    scheduler.close()


class Collected:
    """What one sequence produced, and when it ended."""

    def __init__(self):
        self.pieces: list[str] = []
        self.stats = None
        self.done = threading.Event()

    def end(self, stats) -> None:
        self.stats = stats
        self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def submit(scheduler, model, messages, sampling=GREEDY, max_new_tokens=16) -> Collected:
    out = Collected()
    prompt = PromptFitter(model, CTX).fit(messages, max_new_tokens)
    scheduler.submit(
        BatchRequest(prompt, sampling, model.chat_format.stop, out.pieces.append, out.end)
    )
    return out


def alone(model, messages, sampling=GREEDY, max_new_tokens=16) -> str:
    """The same request through a plain session: the engine's one-conversation path."""
    return "".join(model.session(CTX).reply(messages, sampling, max_new_tokens))


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# With a repetition penalty each row is sampled on its own; without, the batch's greedy rows
# take one argmax.
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.0)])
def test_every_answer_in_a_full_batch_is_the_one_it_gets_alone(scheduler, model, sampling):
    # More requests than slots: the rest wait their turn.
    outs = [submit(scheduler, model, ask(q), sampling) for q in QUESTIONS]
    for out in outs:
        assert out.done.wait(timeout=120)
    assert [out.text for out in outs] == [alone(model, ask(q), sampling) for q in QUESTIONS]
    assert {out.stats.finish_reason for out in outs} <= {"stop", "length"}
    assert sorted(scheduler.free) == [0, 1, 2, 3]


def test_a_seeded_sample_does_not_depend_on_its_neighbours(scheduler, model):
    sampling = SamplingParams(temperature=0.9, seed=7)
    outs = [submit(scheduler, model, ask(q), sampling) for q in QUESTIONS[:3]]
    for out in outs:
        assert out.done.wait(timeout=120)
    assert [out.text for out in outs] == [alone(model, ask(q), sampling) for q in QUESTIONS[:3]]


def test_a_resent_conversation_prefills_only_its_new_turn(scheduler, model):
    first = submit(scheduler, model, ask("a question to continue"))
    assert first.done.wait(timeout=120)
    conversation = [
        *ask("a question to continue"),
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and then?"},
    ]
    again = submit(scheduler, model, conversation)
    assert again.done.wait(timeout=120)
    ids = PromptFitter(model, CTX).fit(conversation, 16).token_ids
    first_ids = PromptFitter(model, CTX).fit(ask("a question to continue"), 16).token_ids
    assert again.stats.reused_tokens >= len(first_ids) - 1
    assert again.stats.prefilled_tokens == len(ids) - again.stats.reused_tokens
    assert again.text == alone(model, conversation)


def test_a_long_prompt_is_prefilled_between_the_steps_of_a_running_stream(scheduler, model):
    running = submit(scheduler, model, ask("keep writing"), max_new_tokens=400)
    while not running.pieces:
        running.done.wait(0.01)
    long_messages = ask("word " * 1100)  # six prefill chunks and more
    long = submit(scheduler, model, long_messages, max_new_tokens=4)
    seen_before = len(running.pieces)
    while not long.pieces and not long.done.is_set():
        long.done.wait(0.001)
    grown = len(running.pieces) - seen_before
    assert long.done.wait(timeout=120) and running.done.wait(timeout=120)
    assert grown >= 2, "the running stream stalled behind the long prompt"
    assert long.text == alone(model, long_messages, max_new_tokens=4)


def test_a_cancelled_sequence_leaves_the_batch_at_once(scheduler, model):
    out = Collected()
    prompt = PromptFitter(model, CTX).fit(ask("cancel me"), 1000)
    request = BatchRequest(prompt, GREEDY, (), out.pieces.append, out.end)
    scheduler.submit(request)
    while not out.pieces and not out.done.is_set():
        out.done.wait(0.005)
    request.cancel.set()
    assert out.done.wait(timeout=30)
    assert out.stats.finish_reason == "cancelled"
    assert out.stats.generated_tokens < 1000
    assert sorted(scheduler.free) == [0, 1, 2, 3]


def test_a_strong_presence_penalty_keeps_a_greedy_reply_from_repeating_a_token(scheduler, model):
    plain = SamplingParams(temperature=0.0)
    penalised = SamplingParams(temperature=0.0, presence_penalty=2.0)
    question = ask("say it again and again")
    repeated = alone(model, question, plain, max_new_tokens=24)
    out = submit(scheduler, model, question, penalised, max_new_tokens=24)
    assert out.done.wait(timeout=120)
    assert out.text == alone(model, question, penalised, max_new_tokens=24)
    assert out.text != repeated


def test_a_sequence_that_fails_ends_with_its_error_and_the_others_go_on(scheduler, model):
    from llamachat.engine.prompts import Prompt

    good = submit(scheduler, model, ask("still answered"))
    errors: list[BaseException] = []
    broken = Collected()
    # A token id past the vocabulary: the embedding lookup of its prefill raises.
    prompt = Prompt([model.config.vocab_size + 7, 5], (), 4)
    scheduler.submit(
        BatchRequest(prompt, GREEDY, (), broken.pieces.append, broken.end, on_error=errors.append)
    )
    assert good.done.wait(timeout=120)
    for _ in range(1000):
        if errors:
            break
        threading.Event().wait(0.01)
    assert len(errors) == 1 and isinstance(errors[0], IndexError)
    assert not broken.done.is_set()
    assert good.text == alone(model, ask("still answered"))
    assert sorted(scheduler.free) == [0, 1, 2, 3]
    after = submit(scheduler, model, ask("after the failure"))
    assert after.done.wait(timeout=120)


def test_logprobs_in_a_batch_are_those_of_the_sequence_alone(scheduler, model):
    question = ask("tell me more")
    sampled = []
    out = Collected()
    prompt = PromptFitter(model, CTX).fit(question, 12)
    scheduler.submit(
        BatchRequest(
            prompt,
            GREEDY,
            model.chat_format.stop,
            out.pieces.append,
            out.end,
            top_logprobs=2,
            on_logprob=sampled.append,
        )
    )
    neighbour = submit(scheduler, model, ask("a neighbour"))
    assert out.done.wait(timeout=120) and neighbour.done.wait(timeout=120)
    reply = model.session(CTX).reply(question, GREEDY, 12, top_logprobs=2)
    "".join(reply)
    assert [s.token_id for s in sampled] == reply.token_ids
    for batched, lone in zip(sampled, reply.logprobs, strict=True):
        # The same tokens; the values to float32 precision (the batch's row is reduced apart).
        assert [i for i, _ in batched.top] == [i for i, _ in lone.top]
        assert batched.logprob == pytest.approx(lone.logprob, abs=1e-5)
        assert [v for _, v in batched.top] == pytest.approx([v for _, v in lone.top], abs=1e-5)
    assert all(len(s.top) == 2 and s.logprob <= 0 for s in sampled)


def test_usage_counts_what_the_slots_hold(scheduler, model):
    outs = [submit(scheduler, model, ask(q), max_new_tokens=8) for q in QUESTIONS[:2]]
    for out in outs:
        assert out.done.wait(timeout=60)
    usage = scheduler.usage()
    assert usage.running == 0 and usage.waiting == 0
    assert 1 <= usage.last_batch <= 2
    # The finished sequences' keys stay in their slots for reuse: at least their prompts.
    held = sum(out.stats.prompt_tokens for out in outs)
    assert held <= usage.kv_tokens <= usage.kv_capacity == 4 * CTX


def test_slots_beyond_the_batch_keep_finished_conversations_for_their_return(model):
    scheduler = BatchScheduler(model, slots=4, ctx=CTX, batch=2)
    try:
        most_running = []
        first = ask("remember me, I will be back")
        answered = submit(scheduler, model, first, max_new_tokens=8)
        assert answered.done.wait(timeout=60)
        # Three others come and go, at once, through a batch of two: the fourth slot keeps it.
        original = scheduler._take

        def counting(*args, **kwargs):
            most_running.append(len(scheduler.running))
            original(*args, **kwargs)

        scheduler._take = counting
        others = [submit(scheduler, model, ask(q), max_new_tokens=8) for q in QUESTIONS[:3]]
        for out in others:
            assert out.done.wait(timeout=60)
            assert (out.stats.finish_reason, out.stats.generated_tokens) == ("length", 8)
        assert max(most_running) == 2
        follow_up = [
            *first,
            {"role": "assistant", "content": answered.text},
            {"role": "user", "content": "I am back"},
        ]
        back = submit(scheduler, model, follow_up, max_new_tokens=4)
        assert back.done.wait(timeout=60)
        assert back.stats.reused_tokens >= answered.stats.prompt_tokens
    finally:
        scheduler.close()


def test_a_batch_larger_than_its_slots_is_refused(model):
    with pytest.raises(ValueError, match="no more than"):
        BatchScheduler(model, slots=2, ctx=CTX, batch=3)


def test_running_ahead_gives_each_request_what_it_gets_in_turn(model):
    """Stop strings, token limits, sampled and greedy rows and logprobs, batched together: the
    same pieces, stats and logprobs whether each step is launched ahead or not."""
    questions = [ask(q) for q in QUESTIONS]
    # A stop string from the middle of each greedy answer, so that most replies end on one.
    stops = [(alone(model, q, GREEDY, 24)[6:9] or "zz",) for q in questions]
    samplings = [GREEDY, SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0)]

    def served(run_ahead: bool, samplings=samplings, with_logprobs=True):
        """Each request's pieces, token count, finish reason and logprobs; and whether a step
        took the last one's tokens straight from the device."""
        scheduler = BatchScheduler(model, slots=4, ctx=CTX, run_ahead=run_ahead)
        chained = []
        take_chained = scheduler._take_chained  # watched, still run
        scheduler._take_chained = lambda *args: (chained.append(1), take_chained(*args))
        outs = []
        try:
            for index, question in enumerate(questions):
                out, logprobs = Collected(), []
                prompt = PromptFitter(model, CTX).fit(question, 8 + 4 * index)
                scheduler.submit(
                    BatchRequest(
                        prompt,
                        samplings[index % len(samplings)],
                        stops[index],
                        out.pieces.append,
                        out.end,
                        top_logprobs=2 if with_logprobs and index % 2 else None,
                        on_logprob=logprobs.append,
                    )
                )
                outs.append((out, logprobs))
            for out, _ in outs:
                assert out.done.wait(timeout=120)
            assert sorted(scheduler.free) == [0, 1, 2, 3]
        finally:
            scheduler.close()
        results = [
            (o.pieces, o.stats.generated_tokens, o.stats.finish_reason, lp) for o, lp in outs
        ]
        return results, bool(chained)

    (in_turn, _), (ahead, _) = served(False), served(True)
    # A row a stop string ends rides along one step more when launched ahead: the steps' batch
    # sizes differ, which may round a logit's last bit differently (the tokens never differ).
    assert [row[:3] for row in ahead] == [row[:3] for row in in_turn]
    for (*_, ours), (*_, theirs) in zip(ahead, in_turn, strict=True):
        assert [lp.token_id for lp in ours] == [lp.token_id for lp in theirs]
        assert [[i for i, _ in lp.top] for lp in ours] == [[i for i, _ in lp.top] for lp in theirs]
        values = [v for lp in ours for v in (lp.logprob, *(v for _, v in lp.top))]
        expected = [v for lp in theirs for v in (lp.logprob, *(v for _, v in lp.top))]
        assert values == pytest.approx(expected, abs=1e-5)
    assert {reason for _, _, reason, _ in in_turn} == {"stop", "length"}
    assert any(lp for *_, lp in in_turn)
    # All greedy, no logprobs: each step's choice feeds the next on the device (chained).
    greedy = [GREEDY, SamplingParams(temperature=0)]  # with a repetition penalty, and without
    (chained, used), (plain, unused) = served(True, greedy, False), served(False, greedy, False)
    assert chained == plain
    assert (used, unused) == (True, False)
    assert {reason for _, _, reason, _ in plain} == {"stop", "length"}


def test_the_common_prefix_is_the_count_of_tokens_two_lists_start_with():
    import random

    from llamachat.engine.session import _common_prefix

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(300))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(200))]
        parted = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
        assert _common_prefix(a, b) == (parted[0] if parted else min(len(a), len(b)))


SYSTEM = "You are a careful assistant who answers in short sentences. " * 12


def test_a_system_prompt_that_conversations_share_is_computed_once(scheduler, model):
    first = [{"role": "system", "content": SYSTEM}, *ask("the first user")]
    second = [{"role": "system", "content": SYSTEM}, *ask("another user entirely")]
    one = submit(scheduler, model, first)
    assert one.done.wait(timeout=120)
    two = submit(scheduler, model, second)
    assert two.done.wait(timeout=120)
    fitter = PromptFitter(model, CTX)
    a, b = fitter.fit(first, 16).token_ids, fitter.fit(second, 16).token_ids
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared > 100  # the system prompt, templated
    assert two.stats.reused_tokens == shared  # copied from the first conversation's slot
    assert two.text == alone(model, second)
    # The first conversation kept its own slot: its next turn reuses all of its prompt.
    follow_up = [*first, {"role": "assistant", "content": one.text}, *ask("and more")]
    again = submit(scheduler, model, follow_up)
    assert again.done.wait(timeout=120)
    assert again.stats.reused_tokens >= len(a)
    assert again.text == alone(model, follow_up)
