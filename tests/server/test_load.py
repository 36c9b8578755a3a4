"""Many clients at once against one server: every greedy answer is the one the request gets
served alone, and a bounded load loop loses or mixes up nothing."""

from __future__ import annotations

import concurrent.futures

import pytest

from .conftest import start_server

GREEDY = {"temperature": 0, "max_tokens": 10}
PROMPTS = [f"Question {i}: what comes after {i}?" for i in range(24)]


@pytest.fixture(scope="module")
def server(tiny_home):
    served = start_server(tiny_home, "-m", "tiny", "--ctx", "256", "--max-batch", "16")
    yield served
    assert served.stop() == 0


@pytest.fixture(scope="module")
def alone(server) -> dict[str, str]:
    """Each prompt's answer asked one at a time, nothing else running."""
    client = server.client()
    return {prompt: answer(client, prompt) for prompt in PROMPTS}


def answer(client, prompt: str) -> str:
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], **GREEDY
    )
    return completion.choices[0].message.content


def test_sixteen_concurrent_clients_each_get_the_answer_they_get_alone(server, alone):
    client = server.client()
    prompts = PROMPTS[:16]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: answer(client, p), prompts))
    assert together == [alone[p] for p in prompts]


def test_a_bounded_load_loop_loses_and_mixes_up_nothing(server, alone):
    client = server.client()
    requests = [PROMPTS[i % len(PROMPTS)] for i in range(200)]

    def one(prompt: str) -> tuple[str, str]:
        return prompt, answer(client, prompt)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, requests, timeout=600))
    assert len(results) == 200
    assert [given for given, _ in results] == requests
    wrong = [prompt for prompt, text in results if text != alone[prompt]]
    assert wrong == []
    assert server.metric("llamachat_requests_running") == 0
    served = 'llamachat_requests_total{route="/v1/chat/completions",status="200"}'
    assert server.metric(served) >= 200
