"""The local backend: one reply's own settings, raw completions, and callers on several threads
served one at a time by the chat's one session."""

from __future__ import annotations

import threading

import pytest

from llamachat.backends import BackendError, ChatSpec, PromptTooLongError, ReplyRequest, Sampling
from llamachat.backends.local import LocalBackend
from llamachat.engine import ChatModel, SamplingParams

GREEDY = ReplyRequest(sampling=Sampling(temperature=0.0, repeat_penalty=1.0), max_tokens=9)


@pytest.fixture(scope="module")
def chat(tiny_store):
    return LocalBackend(tiny_store).open_chat(ChatSpec(model="tiny", ctx=128, device="cpu"))


@pytest.fixture(scope="module")
def engine(tiny_store):
    """The same model straight from the engine, the reference for what the backend gives."""
    return ChatModel.load(tiny_store.get("tiny").path, device="cpu")


def engine_answer(engine, messages, max_new_tokens=9) -> str:
    """The text the engine itself streams for these messages, greedy (what a caller sees: a
    random model's unfinished last character is not part of it)."""
    reply = engine.session(128).reply(
        messages, SamplingParams(temperature=0.0, repeat_penalty=1.0), max_new_tokens
    )
    return "".join(reply)


def test_a_reply_takes_its_own_sampling_and_limit(chat, engine):
    messages = [{"role": "user", "content": "hello there"}]
    reply = chat.reply(messages, request=GREEDY)
    text = "".join(reply)
    assert reply.stats.generated_tokens <= 9
    assert text == engine_answer(engine, messages)


def test_a_completion_continues_the_raw_text(chat, engine):
    prompt = "once upon a time"
    reply = chat.complete(prompt, request=GREEDY)
    text = "".join(reply)
    assert reply.stats.prompt_tokens == len(engine.encode(prompt))
    assert reply.dropped == ()
    session = engine.session(128)
    expected = session.complete(prompt, SamplingParams(temperature=0.0, repeat_penalty=1.0), 9)
    assert text == "".join(expected)


def test_a_completion_longer_than_the_context_is_refused(chat):
    with pytest.raises(PromptTooLongError, match="128"):
        chat.complete("word " * 400, request=GREEDY)


def test_callers_on_several_threads_each_get_their_own_answer(chat, engine):
    questions = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        answers[index] = "".join(chat.reply(questions[index], request=GREEDY))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {i: engine_answer(engine, q) for i, q in enumerate(questions)} == answers


def test_a_reply_never_read_does_not_keep_the_chat_locked(chat):
    chat.reply([{"role": "user", "content": "unread"}], request=GREEDY)
    answered = threading.Event()

    def ask() -> None:
        "".join(chat.reply([{"role": "user", "content": "read"}], request=GREEDY))
        answered.set()

    threading.Thread(target=ask, daemon=True).start()
    assert answered.wait(timeout=60)


@pytest.fixture(scope="module")
def batched(tiny_store):
    spec = ChatSpec(model="tiny", ctx=128, device="cpu", concurrency=3)
    chat = LocalBackend(tiny_store).open_chat(spec)
    yield chat
    chat.close()


def test_a_chat_opened_for_several_replies_writes_them_at_once(batched, chat):
    questions = [[{"role": "user", "content": f"batched {i}"}] for i in range(5)]
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        answers[index] = "".join(batched.reply(questions[index], request=GREEDY))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    alone = {i: "".join(chat.reply(q, request=GREEDY)) for i, q in enumerate(questions)}
    assert answers == alone
    completion = batched.complete("once upon a time", request=GREEDY)
    assert "".join(completion) == "".join(chat.complete("once upon a time", request=GREEDY))
    assert batched.info.context_size == 128


def test_a_batched_reply_left_unread_leaves_its_slot(batched):
    reply = batched.reply([{"role": "user", "content": "stop early"}], request=GREEDY)
    for _ in reply:
        break
    del reply
    scheduler = batched.scheduler
    for _ in range(200):
        if len(scheduler.free) == scheduler.slots:
            break
        threading.Event().wait(0.01)
    assert len(scheduler.free) == scheduler.slots


def test_a_batched_prompt_too_long_is_refused(batched):
    with pytest.raises(PromptTooLongError):
        batched.complete("word " * 400, request=GREEDY)


def test_a_kv_memory_budget_keeps_more_conversations_than_run_at_once(tiny_store):
    from llamachat.engine.batching import slot_bytes

    probe = LocalBackend(tiny_store).open_chat(ChatSpec(model="tiny", ctx=128, device="cpu"))
    each = slot_bytes(probe.model, 128)
    probe.close()
    spec = ChatSpec(model="tiny", ctx=128, device="cpu", concurrency=2, kv_memory=5 * each + 1)
    chat = LocalBackend(tiny_store).open_chat(spec)
    try:
        assert (chat.scheduler.slots, chat.scheduler.batch) == (5, 2)
    finally:
        chat.close()
    too_small = ChatSpec(model="tiny", ctx=128, device="cpu", concurrency=3, kv_memory=2 * each)
    with pytest.raises(BackendError, match="holds 2 conversations of 128 tokens.*3 replies"):
        LocalBackend(tiny_store).open_chat(too_small)


def test_step_tokens_bound_what_a_batched_step_reads(tiny_store):
    from llamachat.engine.session import PREFILL_CHUNK

    chats = [
        LocalBackend(tiny_store).open_chat(
            ChatSpec(model="tiny", ctx=256, device="cpu", concurrency=2, step_tokens=step)
        )
        for step in (None, 48)
    ]
    try:
        assert [c.scheduler.prefill_tokens for c in chats] == [PREFILL_CHUNK, 48]
        reply = chats[1].complete("word " * 50, request=GREEDY)  # read in 48-token passes
        assert "".join(reply) and reply.stats.prompt_tokens > 48
    finally:
        for chat in chats:
            chat.close()


def test_the_load_of_a_session_is_its_one_reply_and_its_cache(chat):
    reply = chat.reply([{"role": "user", "content": "how loaded?"}], request=GREEDY)
    assert chat.load().running == 1  # the reply holds the session until its stream ends
    "".join(reply)
    load = chat.load()
    assert (load.running, load.waiting, load.last_batch) == (0, 0, 0)
    assert reply.prompt_tokens <= load.kv_tokens <= load.kv_capacity == 128


def test_the_load_of_a_batched_chat_is_its_slots(batched):
    reply = batched.reply([{"role": "user", "content": "how loaded?"}], request=GREEDY)
    "".join(reply)
    load = batched.load()
    assert (load.running, load.waiting, load.last_batch) == (0, 0, 0)
    assert load.kv_tokens >= reply.prompt_tokens and load.kv_capacity == 3 * 128


@pytest.mark.parametrize("which", ["chat", "batched"])
def test_the_texts_of_a_replys_tokens_join_to_its_text(which, request):
    opened = request.getfixturevalue(which)
    sampled = Sampling(temperature=1.0, seed=3)
    for stop in [(), ("e",)]:
        asked = ReplyRequest(sampling=sampled, max_tokens=40, logprobs=1, stop=stop)
        reply = opened.complete("Once", request=asked)
        text = "".join(reply)
        texts = [token.text for token in reply.logprobs]
        assert "".join(texts) == text
        # The tiny model's byte tokens split characters: some tokens' text comes with the next.
        assert "" in texts


@pytest.mark.parametrize("tokenizer", ["installed", "folder"])
def test_a_shape_opens_random_weights_with_a_models_tokenizer(
    tiny_store, engine, tiny_model_factory, tokenizer
):
    source = "tiny" if tokenizer == "installed" else str(tiny_model_factory()[0])
    spec = ChatSpec(model="toy", shape="toy", tokenizer=source, ctx=128, device="cpu")
    chat = LocalBackend(tiny_store).open_chat(spec)
    messages = [{"role": "user", "content": "hello there"}]
    reply = chat.reply(messages, request=GREEDY)
    assert "".join(reply)
    assert reply.prompt_tokens == len(engine.prompt_ids(messages))  # the tiny model's template
    assert (reply.stats.generated_tokens, reply.stats.finish_reason) == (9, "length")
    assert (chat.info.model, chat.info.context_length) == ("toy", 2048)
    chat.close()


def test_a_watched_batched_reply_says_once_for_each_step_that_will_not_wait(batched, chat):
    ready = threading.Semaphore(0)
    told = []

    def tell() -> None:
        told.append(threading.current_thread().name)
        ready.release()

    reply = batched.reply([{"role": "user", "content": "watch me"}], request=GREEDY)
    assert reply.watch(tell)
    pieces = iter(reply)
    texts = []
    while True:
        assert ready.acquire(timeout=60)  # each step is announced before it is taken
        try:
            texts.append(next(pieces))
        except StopIteration:
            break
    assert not ready.acquire(timeout=0.2)  # and no step more than there were
    assert "".join(texts) == "".join(
        chat.reply([{"role": "user", "content": "watch me"}], request=GREEDY)
    )
    assert "llamachat-batch" in told  # from the scheduler's thread
    assert not chat.reply([{"role": "user", "content": "hi"}], request=GREEDY).watch(tell)


def test_a_split_model_closed_with_its_chat_lets_the_next_one_split(tiny_store, engine):
    """The app closes the chat it leaves before it opens the next: a model split over
    processes must let go of them then (one split model at a time in a process)."""
    backend = LocalBackend(tiny_store)
    messages = [{"role": "user", "content": "hello there"}]
    for _ in range(2):
        chat = backend.open_chat(ChatSpec(model="tiny", ctx=128, device="cpu", gpus=2))
        text = "".join(chat.reply(messages, request=GREEDY))
        assert text == engine_answer(engine, messages)
        chat.close()
