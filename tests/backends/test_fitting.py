"""Fitting a conversation to a remote model's window on the client (backends/fitting.py), where
neither the model's tokenizer is here nor the server counts tokens (ollama's case): the count is
estimated, conservatively until the server's usage has said how long its tokens are."""

from __future__ import annotations

import pytest

from llamachat.backends.base import PromptTooLongError
from llamachat.backends.fitting import RemoteFitter


def conversation(turns: int, words: int = 20) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}]
    for index in range(turns):
        messages.append({"role": "user", "content": f"question {index} " + "word " * words})
        messages.append({"role": "assistant", "content": f"answer {index} " + "word " * words})
    return [*messages, {"role": "user", "content": "and now?"}]


def no_count(messages) -> None:  # a server without /tokenize
    return None


def test_a_short_conversation_is_neither_counted_nor_cut():
    def never(messages):
        raise AssertionError("counted")

    def never_opened():
        raise AssertionError("the tokenizer was loaded")

    fitter = RemoteFitter(4096, never_opened, never)
    prompt = fitter.fit([{"role": "user", "content": "hi"}], max_tokens=100)
    assert prompt.dropped == () and prompt.max_new_tokens == 100


def test_before_the_server_counted_a_token_is_taken_for_a_byte():
    messages = conversation(8)  # ~1,700 bytes
    fitter = RemoteFitter(1024, None, no_count)
    prompt = fitter.fit(messages, max_tokens=128)
    sent = [m for i, m in enumerate(messages) if i not in prompt.dropped]
    assert prompt.dropped and prompt.dropped[0] == 1  # the system prompt stays
    assert sum(len(m["content"].encode()) for m in sent) + 128 <= 1024


def test_once_the_server_counted_the_estimate_follows_its_tokens():
    messages = conversation(8)
    fitter = RemoteFitter(1024, None, no_count)
    before = fitter.fit(messages, max_tokens=128).dropped
    fitter.counted(messages[:3], prompt_tokens=sum(len(m["content"]) for m in messages[:3]) // 4)
    after = fitter.fit(messages, max_tokens=128).dropped
    assert len(after) < len(before)  # four bytes a token: more of the conversation fits
    assert fitter.use(messages).window == 1024


def test_a_last_message_longer_than_the_window_is_refused_in_one_line():
    fitter = RemoteFitter(256, None, no_count)
    with pytest.raises(PromptTooLongError, match="more than the context of 256"):
        fitter.fit([{"role": "user", "content": "x" * 2000}], max_tokens=16)


def test_a_server_that_does_not_say_its_window_gets_the_conversation_whole():
    messages = conversation(50)
    prompt = RemoteFitter(0, None, no_count).fit(messages, max_tokens=64)
    assert prompt.dropped == () and prompt.max_new_tokens == 64
