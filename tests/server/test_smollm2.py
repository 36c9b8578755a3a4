"""`llamachat serve` with the real SmolLM2: a served greedy answer is the one `llamachat ask` gives,
whether asked alone or beside others, and a second turn reuses the first one's cache."""

from __future__ import annotations

import concurrent.futures
import itertools

import pytest

from tests.conftest import CLI_GREEDY, run_cli

from .conftest import check_completion_logprobs, start_server

pytestmark = pytest.mark.smollm2
QUESTIONS = ["What is the capital of France?", "Name three colours.", "用一句话介绍长城。"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(smollm2_env):
    served = start_server(smollm2_env, "-m", "smollm2", "--ctx", "1024", "--max-batch", "4")
    yield served
    assert served.stop() == 0


def ask_cli(env, question: str) -> str:
    result = run_cli(
        "ask",
        question,
        "-m",
        "smollm2",
        "--temperature",
        "0",
        "--repeat-penalty",
        str(CLI_GREEDY.repeat_penalty),
        "--max-tokens",
        str(MAX_TOKENS),
        "--ctx",
        "1024",
        "--local",  # the engine in the CLI's process, not the server this module runs
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().removesuffix("\n")


def ask_server(client, question: str) -> str:
    completion = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"repeat_penalty": CLI_GREEDY.repeat_penalty},
    )
    return completion.choices[0].message.content


def test_served_answers_are_the_cli_answers_alone_and_together(server, smollm2_env):
    client = server.client()
    expected = [ask_cli(smollm2_env, q) for q in QUESTIONS]
    assert [ask_server(client, q) for q in QUESTIONS] == expected
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        assert list(pool.map(lambda q: ask_server(client, q), QUESTIONS)) == expected


def test_a_second_turn_prefills_only_what_is_new(server):
    client = server.client()
    first = [{"role": "user", "content": "Tell me a fact about the sea."}]
    reply = client.chat.completions.create(
        model="smollm2", messages=first, temperature=0, max_tokens=16
    )
    second = [
        *first,
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And another?"},
    ]
    again = client.chat.completions.create(
        model="smollm2", messages=second, temperature=0, max_tokens=16
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= reply.usage.prompt_tokens - 1
    assert cached < again.usage.prompt_tokens


def test_completion_logprobs_name_the_tokens_of_the_text(server):
    completion = server.client().completions.create(
        model="smollm2",
        prompt="The capital of France is",
        temperature=0,
        max_tokens=12,
        logprobs=2,
        extra_body={"repeat_penalty": 1.0},
    )
    (choice,) = completion.choices
    check_completion_logprobs(choice, top=2)
    # Greedy, no penalty, English text: each token is the most likely of its alternatives.
    for token, alternatives in zip(
        choice.logprobs.tokens, choice.logprobs.top_logprobs, strict=True
    ):
        assert token == max(alternatives, key=alternatives.get)


def test_another_users_conversation_reuses_a_shared_system_prompt(server):
    client = server.client()
    system = {"role": "system", "content": "You answer as a ship's captain would. " * 8}
    conversations = [[system, {"role": "user", "content": question}] for question in (
        "Where are we headed?", "What is for dinner tonight?")]  # fmt: skip

    def ask(messages):
        return client.chat.completions.create(
            model="smollm2", messages=messages, temperature=0, max_tokens=8
        )

    replies = [ask(messages) for messages in conversations]
    first, second = (reply.usage for reply in replies)
    # The second prompt differs from the first after the system prompt (the user turn).
    assert second.prompt_tokens_details.cached_tokens > 60
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens - 5
    assert first.prompt_tokens_details.cached_tokens < second.prompt_tokens_details.cached_tokens
    # ...and did not take the first conversation's place: its next turn finds all of it.
    answer = {"role": "assistant", "content": replies[0].choices[0].message.content}
    back = ask([*conversations[0], answer, {"role": "user", "content": "Why?"}]).usage
    assert back.prompt_tokens_details.cached_tokens >= first.prompt_tokens - 1


def test_a_reply_cut_off_inside_a_character_ends_before_it(server):
    # SmolLM2 spells most Chinese characters in two or three tokens, so some token budgets
    # run out inside one: what was said then ends at the last whole character, no U+FFFD.
    client = server.client()
    question = [{"role": "user", "content": "请用三句话介绍一下长城。"}]

    def answer(max_tokens: int, stream: bool) -> str:
        options = dict(temperature=0, max_tokens=max_tokens, stream=stream)
        reply = client.chat.completions.create(model="smollm2", messages=question, **options)
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
        return reply.choices[0].message.content

    whole = answer(12, stream=False)
    cut = [answer(tokens, stream=False) for tokens in range(1, 9)]
    assert all(whole.startswith(text) and "\ufffd" not in text for text in cut), cut
    # Some budget ended inside a character: its answer is no longer than the one before.
    assert any(len(later) <= len(earlier) for earlier, later in itertools.pairwise(cut)), cut
    assert [answer(tokens, stream=True) for tokens in range(1, 9)] == cut
