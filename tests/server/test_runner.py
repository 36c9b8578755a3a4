"""A reply read on the event loop (server/runner.py): a batched reply's pieces come through the
loop as the scheduler writes them, and a reader that falls behind gets them joined."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from llamachat.backends import ChatSpec, ReplyRequest, Sampling
from llamachat.backends.local import LocalBackend
from llamachat.server.metrics import Metrics
from llamachat.server.runner import Gate, Run

GREEDY = ReplyRequest(sampling=Sampling(temperature=0.0), max_tokens=24)
ASKED = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def chats(tiny_store):
    backend = LocalBackend(tiny_store)
    batched = backend.open_chat(ChatSpec(model="tiny", ctx=256, device="cpu", concurrency=4))
    alone = backend.open_chat(ChatSpec(model="tiny", ctx=256, device="cpu"))
    yield batched, alone
    batched.close()
    alone.close()


async def _read(chat, lag: bool) -> tuple[list[str], object]:
    gate = Gate("tiny", running=4, queue=4, metrics=Metrics())
    await gate.enter()
    run = Run(lambda cancel: chat.reply(ASKED, cancel=cancel, request=GREEDY), gate, chat)
    await run.start()
    if lag:  # the reader is busy while the whole reply is written
        deadline = time.monotonic() + 60
        while chat.load().running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the loop takes the last steps
    pieces = [text async for text, _ in run.pieces_with_logprobs()]
    return pieces, run.stats


def test_a_batched_reply_reads_on_the_loop_and_a_late_reader_gets_it_joined(chats):
    batched, alone = chats
    expected = "".join(alone.reply(ASKED, request=GREEDY))
    prompt, stats = asyncio.run(_read(batched, lag=False))
    assert "".join(prompt) == expected and stats.generated_tokens == 24
    late, stats = asyncio.run(_read(batched, lag=True))
    assert late == [expected]  # every piece that waited, in one
    assert stats.generated_tokens == 24


def test_a_reply_that_cannot_be_watched_is_read_on_a_thread(chats):
    _, alone = chats
    pieces, stats = asyncio.run(_read(alone, lag=False))
    assert "".join(pieces) == "".join(alone.reply(ASKED, request=GREEDY))
    assert stats.finish_reason == "length"


def test_a_request_cancelled_while_the_backend_takes_it_lets_the_gate_go(chats):
    batched, _ = chats
    taken = threading.Event()
    go_on = threading.Event()
    replies = []

    def start(cancel):
        taken.set()
        go_on.wait(timeout=60)  # the backend is slow to take this one
        replies.append(batched.reply(ASKED, cancel=cancel, request=GREEDY))
        return replies[-1]

    async def scenario() -> bool:
        gate = Gate("tiny", running=1, queue=0, metrics=Metrics())
        await gate.enter()
        run = Run(start, gate, batched)
        starting = asyncio.ensure_future(run.start())
        while not taken.is_set():
            await asyncio.sleep(0.01)
        starting.cancel()  # the request goes away (a client, a shutdown)
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        go_on.set()
        deadline = time.monotonic() + 60
        while gate.slots.locked() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not gate.slots.locked()

    assert asyncio.run(scenario())  # the slot is free again
    assert replies and replies[0].stats.finish_reason == "cancelled"


def test_a_request_to_an_engine_process_that_is_gone_is_503(tiny_store):
    import os
    import signal

    from llamachat.backends.process import EngineProcess
    from llamachat.server.errors import ApiError

    engine = EngineProcess(tiny_store.root, [ChatSpec(model="tiny", ctx=256, device="cpu")])
    lost = threading.Event()
    engine.when_lost(lambda _: lost.set())
    chat = engine.chats["tiny"]
    try:
        os.kill(engine.pid, signal.SIGKILL)
        assert lost.wait(30)

        async def ask() -> ApiError:
            gate = Gate("tiny", 1, 0, Metrics())
            await gate.enter()
            run = Run(lambda cancel: chat.reply(ASKED, cancel, GREEDY), gate, chat)
            with pytest.raises(ApiError) as refused:
                await run.start()
            assert not gate.slots.locked()  # the refused request let its slot go
            return refused.value

        error = asyncio.run(ask())
        assert (error.status, error.code) == (503, "backend_gone")
        assert error.message == "the engine process stopped (signal 9)"
    finally:
        engine.close()
