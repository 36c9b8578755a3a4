"""The engine in a process of its own (backends/process.py): its replies are those of the same
chat opened here, they stop when asked, and a process that dies or cannot open its model is
said so in one line, in this process."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from llamachat.backends import (
    ChatSpec,
    ModelUnavailableError,
    PromptTooLongError,
    ReplyRequest,
    Sampling,
)
from llamachat.backends.local import ContextSizeError, LocalBackend
from llamachat.backends.process import EngineLostError, EngineProcess

GREEDY = ReplyRequest(sampling=Sampling(temperature=0.0, repeat_penalty=1.0), max_tokens=9)
SPEC = ChatSpec(model="tiny", ctx=128, device="cpu", concurrency=3)


@pytest.fixture(scope="module")
def engine(tiny_store):
    engine = EngineProcess(tiny_store.root, [SPEC])
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def here(tiny_store):
    """The same chat opened in this process: what the engine process must give."""
    chat = LocalBackend(tiny_store).open_chat(SPEC)
    yield chat
    chat.close()


def test_replies_from_several_threads_are_those_of_the_chat_opened_here(engine, here):
    chat = engine.chats["tiny"]
    questions = [[{"role": "user", "content": f"in a process {i}"}] for i in range(5)]
    answers: dict[int, tuple[str, int]] = {}

    def ask(index: int) -> None:
        reply = chat.reply(questions[index], request=GREEDY)
        answers[index] = ("".join(reply), reply.stats.generated_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, question in enumerate(questions):
        reply = here.reply(question, request=GREEDY)
        assert answers[index] == ("".join(reply), reply.stats.generated_tokens)
    assert chat.info == here.info


def test_a_completion_with_logprobs_and_its_stats_come_across(engine, here):
    asked = ReplyRequest(sampling=Sampling(temperature=1.0, seed=5), max_tokens=30, logprobs=2)
    there = engine.chats["tiny"].complete("Once", request=asked)
    text = "".join(there)
    reference = here.complete("Once", request=asked)
    assert text == "".join(reference)
    assert there.logprobs == reference.logprobs
    assert "".join(token.text for token in there.logprobs) == text
    assert there.prompt_tokens == reference.prompt_tokens
    assert there.stats.generated_tokens == reference.stats.generated_tokens
    assert there.stats.finish_reason == reference.stats.finish_reason


def test_a_prompt_too_long_is_refused_with_the_engines_error(engine):
    with pytest.raises(PromptTooLongError, match="128"):
        engine.chats["tiny"].complete("word " * 400, request=GREEDY)


def test_a_cancelled_reply_ends_within_a_token_and_frees_its_slot(engine):
    chat = engine.chats["tiny"]
    cancel = threading.Event()
    long = ReplyRequest(sampling=Sampling(temperature=1.0, seed=1), max_tokens=100)
    reply = chat.reply([{"role": "user", "content": "go on and on"}], cancel=cancel, request=long)
    pieces = iter(reply)
    next(pieces)
    cancel.set()
    rest = list(pieces)
    assert reply.stats.finish_reason == "cancelled"
    assert reply.stats.generated_tokens < 100 and len(rest) < 99
    load = chat.load()
    assert (load.running, load.waiting) == (0, 0)


def test_a_watched_reply_says_once_for_each_step_that_will_not_wait(engine, here):
    ready = threading.Semaphore(0)
    reply = engine.chats["tiny"].reply([{"role": "user", "content": "watch"}], request=GREEDY)
    assert reply.watch(ready.release)
    pieces, texts = iter(reply), []
    while True:
        assert ready.acquire(timeout=60)
        try:
            texts.append(next(pieces))
        except StopIteration:
            break
    assert not ready.acquire(timeout=0.2)
    assert "".join(texts) == "".join(
        here.reply([{"role": "user", "content": "watch"}], request=GREEDY)
    )


def test_the_context_use_is_the_chats_there(engine, here):
    messages = [{"role": "user", "content": "how much room?"}]
    assert engine.chats["tiny"].context_use(messages) == here.context_use(messages)


def test_a_model_that_cannot_open_is_refused_with_its_error(tiny_store):
    with pytest.raises(ModelUnavailableError, match="nope"):
        EngineProcess(tiny_store.root, [ChatSpec(model="nope", device="cpu")])
    with pytest.raises(ContextSizeError) as raised:
        EngineProcess(tiny_store.root, [ChatSpec(model="tiny", ctx=10**6, device="cpu")])
    assert raised.value.requested == 10**6  # intact, for the server to say in its words


def test_an_engine_process_that_dies_fails_its_replies_and_says_so(tiny_store):
    why: list[str] = []
    lost = threading.Event()
    engine = EngineProcess(tiny_store.root, [SPEC])
    engine.when_lost(lambda said: (why.append(said), lost.set()))
    try:
        chat = engine.chats["tiny"]
        long = ReplyRequest(sampling=Sampling(temperature=1.0, seed=2), max_tokens=120)
        reply = chat.reply([{"role": "user", "content": "until killed"}], request=long)
        pieces = iter(reply)
        next(pieces)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineLostError, match=r"the engine process stopped \(signal 9\)"):
            list(pieces)
        assert lost.wait(10) and why == ["the engine process stopped (signal 9)"]
        with pytest.raises(EngineLostError):
            chat.reply([{"role": "user", "content": "anyone?"}], request=GREEDY)
    finally:
        engine.close()
