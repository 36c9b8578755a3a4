"""A session's KV cache saved to disk and loaded into another session (engine/saved_cache.py):
the next reply is the one a full prefill gives, token for token, without prefilling; a file
that is not what it must be is refused, never used."""

from __future__ import annotations

import os
import stat

import pytest

from llamachat.engine import ChatModel, SamplingParams
from llamachat.engine.saved_cache import SavedCacheError, load, save

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.1)
IDENTITY = {"model": "tiny", "weights": "f16", "dtype": "float32"}
FIRST = [{"role": "user", "content": "Tell me about the quick brown fox and the lazy dog."}]


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> ChatModel:
    return ChatModel.load(tiny_model_factory()[0], device="cpu")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A conversation's first exchange, its session's cache saved; and the second turn."""
    session = model.session(512)
    reply = session.reply(FIRST, GREEDY, 24)
    answer = "".join(reply)
    path = tmp_path_factory.mktemp("kv") / "conversation.safetensors"
    assert save(session, path, IDENTITY) == len(session.cached_ids) > 0
    turns = [*FIRST, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
    return path, turns


def test_a_resumed_conversation_answers_as_a_full_prefill_does_without_prefilling(model, saved):
    path, turns = saved
    resumed = model.session(512)
    held = load(resumed, path, IDENTITY)
    again = resumed.reply(turns, GREEDY, 24)
    text = "".join(again)
    fresh = model.session(512).reply(turns, GREEDY, 24)
    assert text == "".join(fresh)
    assert fresh.stats.reused_tokens == 0
    assert again.stats.reused_tokens > held // 2  # the first exchange, bar what the template ends
    assert again.stats.prefilled_tokens < fresh.stats.prefilled_tokens


def test_a_saved_cache_is_the_users_alone(saved):
    path, _ = saved
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "another model", "not a file"])
def test_a_cache_that_is_not_what_it_must_be_is_refused(model, saved, tmp_path, damage):
    path, turns = saved
    bad = tmp_path / "bad.safetensors"
    data = bytearray(path.read_bytes())
    identity = IDENTITY
    if damage == "flipped byte":
        data[-100] ^= 0x40
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "another model":
        identity = {**IDENTITY, "model": "tiny-mqa"}
    elif damage == "not a file":
        data = bytearray(b"not a safetensors file at all")
    bad.write_bytes(bytes(data))
    session = model.session(512)
    with pytest.raises(SavedCacheError):
        load(session, bad, identity)
    assert session.cached_ids == []  # left empty: the next reply prefills everything
    reply = session.reply(turns, GREEDY, 4)
    assert "".join(reply) and reply.stats.reused_tokens == 0


def test_a_cache_larger_than_the_context_is_refused(model, saved):
    path, _ = saved
    with pytest.raises(SavedCacheError, match="more than the context"):
        load(model.session(16), path, IDENTITY)
