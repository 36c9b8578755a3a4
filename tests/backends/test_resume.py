"""Instant resume through the backend interface (LocalChat.save_context / restore_context): a
conversation's KV cache saved when it is left and loaded when it is opened again answers token
for token as a full prefill does; a stale, damaged or truncated file is never used for more
than the tokens it matches; saving keeps to its budget, and only where it pays."""

from __future__ import annotations

import os
import stat
import time

import pytest

from llamachat.backends import ChatSpec, ReplyRequest, Sampling, local
from llamachat.backends.local import LocalBackend, worth_saving
from llamachat.backends.remote import RemoteChat
from llamachat.engine import ChatModel, SamplingParams
from llamachat.kv_files import ContextFiles

GREEDY = ReplyRequest(sampling=Sampling(temperature=0.0, repeat_penalty=1.1), max_tokens=16)
FIRST = [{"role": "user", "content": "Tell me about the quick brown fox and the lazy dog."}]


@pytest.fixture(scope="module")
def backend(tiny_store):
    return LocalBackend(tiny_store)


@pytest.fixture(scope="module")
def saver(backend):
    return backend.open_chat(ChatSpec(model="tiny", ctx=256, device="cpu"))


@pytest.fixture(scope="module")
def resumer(backend):
    """Another chat on the model, as a later process would open it."""
    return backend.open_chat(ChatSpec(model="tiny", ctx=256, device="cpu"))


@pytest.fixture(scope="module")
def engine(tiny_store):
    """The model straight from the engine: each reply of its own fresh session is a full
    prefill, the reference."""
    return ChatModel.load(tiny_store.get("tiny").path, device="cpu")


@pytest.fixture
def always(monkeypatch):
    """Saving pays whatever the length: the tiny model prefills far faster than a disk reads."""
    monkeypatch.setattr(local, "MIN_TOKENS", 1)
    monkeypatch.setattr(local, "MIN_GAIN_S", float("-inf"))


def prefilled(engine, messages) -> list[int]:
    reply = engine.session(256).reply(
        messages, SamplingParams(temperature=0.0, repeat_penalty=1.1), 16
    )
    "".join(reply)
    assert reply.stats.reused_tokens == 0
    return reply.token_ids


def kept(*chats, budget=10**9, folder) -> ContextFiles:
    files = ContextFiles(folder, budget)
    for chat in chats:
        chat.keep_contexts(files, {"model": "tiny", "source": "test"})
    return files


def first_exchange(chat) -> list[dict[str, str]]:
    answer = "".join(chat.reply(FIRST, request=GREEDY))
    return [*FIRST, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]


def resumed_reply(chat, key, turns):
    restored = chat.restore_context(key)
    reply = chat.reply(turns, request=GREEDY)
    "".join(reply)
    return restored, reply


def test_a_resumed_conversation_answers_token_for_token_as_a_full_prefill(
    saver, resumer, engine, always, tmp_path
):
    files = kept(saver, resumer, folder=tmp_path / "kv")
    turns = first_exchange(saver)
    held = saver.save_context("7")
    assert held == len(saver.session.cached_ids) > 0
    restored, reply = resumed_reply(resumer, "7", turns)
    assert restored == held
    assert reply._reply.token_ids == prefilled(engine, turns)
    assert reply.stats.reused_tokens > held // 2  # counted as reused, not prefilled
    assert reply.stats.prefilled_tokens < reply.stats.prompt_tokens - held // 2
    (saved,) = files.files()
    assert saved.key == "7" and saved.size > 0


def test_saved_caches_are_the_users_alone(saver, always, tmp_path):
    files = kept(saver, folder=tmp_path / "kv")
    first_exchange(saver)
    assert saver.save_context("1")
    (saved,) = files.files()
    assert stat.S_IMODE(os.stat(files.folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(saved.path).st_mode) == 0o600


def test_a_stale_file_is_used_only_for_the_prefix_the_conversation_still_has(
    saver, resumer, engine, always, tmp_path
):
    kept(saver, resumer, folder=tmp_path / "kv")
    turns = first_exchange(saver)
    held = saver.save_context("3")
    # The user edited the first answer: the file's tokens part from the prompt within it.
    edited = [turns[0], {"role": "assistant", "content": "Something else."}, turns[2]]
    restored, reply = resumed_reply(resumer, "3", edited)
    assert restored == held
    assert reply._reply.token_ids == prefilled(engine, edited)
    assert 0 < reply.stats.reused_tokens < held


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty"])
def test_a_damaged_file_is_ignored_and_removed_and_the_answer_is_the_same(
    saver, resumer, engine, always, tmp_path, damage
):
    files = kept(saver, resumer, folder=tmp_path / "kv")
    turns = first_exchange(saver)
    saver.save_context("5")
    (saved,) = files.files()
    data = bytearray(saved.path.read_bytes())
    if damage == "flipped byte":
        data[-100] ^= 0x40
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    saved.path.write_bytes(bytes(data))
    restored, reply = resumed_reply(resumer, "5", turns)
    assert restored == 0
    assert reply._reply.token_ids == prefilled(engine, turns)
    assert files.files() == []


def test_a_file_longer_than_a_smaller_context_is_kept_for_a_larger_one(
    backend, saver, always, tmp_path
):
    narrow = backend.open_chat(ChatSpec(model="tiny", ctx=16, device="cpu"))
    files = kept(saver, narrow, folder=tmp_path / "kv")
    first_exchange(saver)
    assert saver.save_context("6") > 16
    assert narrow.restore_context("6") == 0
    assert [f.key for f in files.files()] == ["6"]


def test_another_models_file_is_not_loaded(saver, resumer, always, tmp_path):
    kept(saver, folder=tmp_path / "kv")
    resumer.keep_contexts(ContextFiles(tmp_path / "kv"), {"model": "tiny", "source": "again"})
    first_exchange(saver)
    assert saver.save_context("2")
    assert resumer.restore_context("2") == 0  # another identity: another file name


def test_the_budget_keeps_the_most_recently_used_within_it(saver, always, tmp_path):
    files = kept(saver, folder=tmp_path / "kv")
    first_exchange(saver)
    size = len(saver.session.cached_ids) * saver.session.cache.bytes_per_token
    kept(saver, folder=tmp_path / "kv", budget=int(size * 2.5))  # room for two files
    for key in ("1", "2", "3"):
        assert saver.save_context(key)
        past = time.time() - 100 + int(key)  # clocks of a coarse file system: one second apart
        (path,) = [f.path for f in files.files() if f.key == key]
        os.utime(path, (past, past))
    assert sorted(f.key for f in files.files()) == ["2", "3"]
    assert sum(f.size for f in files.files()) <= files.budget


def test_a_budget_of_zero_writes_nothing(saver, always, tmp_path):
    files = kept(saver, folder=tmp_path / "kv", budget=0)
    first_exchange(saver)
    assert saver.save_context("1") is None
    assert files.files() == []


def test_a_short_conversation_that_prefills_in_a_blink_is_not_saved(saver, tmp_path):
    files = kept(saver, folder=tmp_path / "kv")
    first_exchange(saver)
    assert saver.save_context("1") is None
    assert files.files() == []


def test_leaving_again_without_new_turns_writes_nothing_new(saver, always, tmp_path):
    files = kept(saver, folder=tmp_path / "kv")
    first_exchange(saver)
    assert saver.save_context("4")
    (saved,) = files.files()
    before = saved.path.stat().st_ino
    assert saver.save_context("4") == len(saver.session.cached_ids)
    assert saved.path.stat().st_ino == before  # the same file, touched, not written again


@pytest.mark.parametrize(
    ("tokens", "size", "rate", "saved"),
    [
        (100, 10**6, 400.0, False),  # fewer than MIN_TOKENS: a blink to prefill
        (4_000, 190 * 10**6, 390.0, True),  # SmolLM2 on 2 CPU cores: 10 s against 0.2
        (4_064, 524 * 10**6, 17_700.0, False),  # 8b on an H200: 230 ms against 0.5 s
        (300, 14 * 10**6, 500.0, True),
        (300, 14 * 10**6, 5_000.0, False),
        (1_000, 10**6, None, True),  # no rate measured on an unknown device
    ],
)
def test_saving_pays_where_prefill_is_slower_than_the_disk(tokens, size, rate, saved):
    assert worth_saving(tokens, size, rate) is saved


def test_a_remote_chat_keeps_nothing():
    chat = RemoteChat.__new__(RemoteChat)
    assert chat.save_context("1") is None and chat.restore_context("1") == 0
