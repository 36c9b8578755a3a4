"""A full queue, a client that goes away mid-stream, refused binds, and how the server stops."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from llamachat.processes import pid_alive
from tests.conftest import cli_env, run_cli

from .conftest import REQUEST_S, start_server

LONG = {"temperature": 0, "max_tokens": 900}  # a random tiny model runs to its limit
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def one_slot(tiny_home):
    """One reply at a time and no waiting room: the second request is refused at once."""
    served = start_server(tiny_home, "--max-batch", "1", "--max-queue", "0")
    yield served
    served.stop()


def wait_until_idle(server) -> None:
    deadline = time.monotonic() + REQUEST_S
    while server.metric("llamachat_requests_running") != 0:
        assert time.monotonic() < deadline, "the cancelled reply still runs"
        time.sleep(0.1)


def test_a_request_beyond_the_queue_is_503_with_retry_after(one_slot):
    client = one_slot.client()
    stream = client.chat.completions.create(model="tiny", messages=HI, stream=True, **LONG)
    try:
        next(iter(stream))  # the first reply holds the only slot now
        response = httpx.post(
            f"{one_slot.url}/v1/chat/completions",
            json={"model": "tiny", "messages": HI, "max_tokens": 2},
            timeout=REQUEST_S,
        )
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
    finally:
        stream.close()
    wait_until_idle(one_slot)


def test_a_client_that_disconnects_mid_stream_cancels_its_reply(one_slot):
    client = one_slot.client()
    before = one_slot.metric("llamachat_generated_tokens_total")
    stream = client.chat.completions.create(model="tiny", messages=HI, stream=True, **LONG)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert one_slot.metric("llamachat_batch_running") == 1
    assert one_slot.metric("llamachat_batch_size") == 1
    stream.close()
    wait_until_idle(one_slot)
    assert one_slot.metric("llamachat_batch_running") == 0
    assert one_slot.metric("llamachat_batch_size") == 0
    # The slot is free again: the next request is served, not refused.
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    assert one_slot.metric("llamachat_kv_cache_tokens") >= reply.usage.prompt_tokens
    # The cancelled reply was not counted as finished.
    assert one_slot.metric("llamachat_generated_tokens_total") == before + 3


LONG_CTX = 16384  # a reply to the whole window takes the tiny model many seconds


@pytest.fixture(scope="module", params=[1, 4], ids=["one-session", "batched"])
def long_server(request, tiny_model_factory, tmp_path_factory):
    """A tiny model with a long window, served to one reply at a time or to several."""
    env = cli_env(tmp_path_factory.mktemp("serve-long"))
    folder = tiny_model_factory(max_position_embeddings=LONG_CTX)[0]
    result = run_cli("pull", str(folder), "--as", "long", env=env)
    assert result.returncode == 0, result.stderr.decode()
    served = start_server(
        env, "-m", "long", "--ctx", str(LONG_CTX), "--max-batch", str(request.param)
    )
    yield served
    served.stop()


def test_a_client_that_drops_a_plain_request_cancels_its_reply(long_server):
    limit = LONG_CTX - 64
    body = {"model": "long", "messages": HI, "max_tokens": limit, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(
            f"{long_server.url}/v1/chat/completions",
            json=body,
            timeout=httpx.Timeout(REQUEST_S, read=2),
        )
    deadline = time.monotonic() + REQUEST_S
    while long_server.metric("llamachat_batch_running") != 0:
        assert time.monotonic() < deadline, "the dropped reply still runs"
        time.sleep(0.1)
    # It stopped when the client went, long before its token limit: the KV cache holds what
    # it had written by then.
    assert long_server.metric("llamachat_kv_cache_tokens") < limit / 2
    assert long_server.metric("llamachat_generated_tokens_total") == 0  # not a finished reply
    wait_until_idle(long_server)


def test_binding_beyond_loopback_without_a_key_is_refused(tiny_home):
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "0", env=tiny_home, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.decode().strip().splitlines()
    assert "--api-key" in line and "--no-api-key-on-network" in line


def engine_pid(served) -> int:
    """The server's engine process (multiprocessing's resource tracker is a child too)."""
    pid = served.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    (engine,) = [
        int(child)
        for child in children
        if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
    ]
    return engine


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_ctrl_c_and_sigterm_stop_the_server(tiny_home, sig, code):
    served = start_server(tiny_home)
    try:
        client = served.client()
        assert client.models.list().data[0].id == "tiny"
        engine = engine_pid(served)
        assert served.stop(sig) == code
    finally:
        served.stop(signal.SIGKILL)  # a no-op once it has stopped; never left running
    assert "Traceback" not in "".join(served.log)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    assert not pid_alive(engine)  # the engine process went with it


def test_a_server_whose_engine_process_dies_stops_in_one_line(tiny_home):
    served = start_server(tiny_home)
    try:
        client = served.client()
        stream = client.chat.completions.create(model="tiny", messages=HI, stream=True, **LONG)
        chunks = iter(stream)
        next(chunks), next(chunks)
        os.kill(engine_pid(served), signal.SIGKILL)
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            list(chunks)  # the reply in flight fails, in the stream's own way
        assert served.process.wait(timeout=60) == 1
    finally:
        served.stop(signal.SIGKILL)
    log = "".join(served.log)
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1] == (
        "llamachat: error: the engine process stopped (signal 9); the server stopped with it"
    )


def test_a_kv_memory_budget_keeps_more_conversations_than_the_batch(tiny_home):
    served = start_server(tiny_home, "--max-batch", "2", "--ctx", "256", "--kv-memory", "0.01")
    try:
        capacity = served.metric("llamachat_kv_cache_capacity_tokens")
    finally:
        served.stop()
    assert capacity > 2 * 256  # more slots than replies written at once, each a whole context
    too_small = run_cli(
        "serve", "--port", "0", "--max-batch", "4", "--kv-memory", "0.000001", env=tiny_home,
        timeout=120,
    )  # fmt: skip
    assert too_small.returncode == 2
    (line,) = too_small.stderr.decode().strip().splitlines()[-1:]
    assert "holds 0 conversations" in line and "4 replies at once" in line


def test_too_few_step_tokens_are_refused_in_one_line(tiny_home):
    refused = run_cli("serve", "--port", "0", "--step-tokens", "8", env=tiny_home, timeout=60)
    assert refused.returncode == 2
    assert "--step-tokens" in refused.stderr.decode() and b"Traceback" not in refused.stderr


def test_sigterm_as_soon_as_the_server_says_it_serves_stops_it(tiny_home):
    """Before uvicorn's own handler is in place, a SIGTERM was taken and forgotten: the server
    went on serving."""
    served = start_server(tiny_home)
    try:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
    finally:
        served.stop(signal.SIGKILL)


def test_a_single_slot_server_continues_a_reply_left_open(one_slot):
    """The single-session chat reads continue_final_message too: what follows the assistant's
    text, as the raw completion of the conversation with that turn not closed (ChatML)."""
    messages = [*HI, {"role": "assistant", "content": "Hello th"}]
    greedy = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    continued = httpx.post(
        f"{one_slot.url}/v1/chat/completions",
        json={
            **greedy,
            "messages": messages,
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
        timeout=REQUEST_S,
    )
    assert continued.status_code == 200, continued.text
    left_open = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello th"
    raw = httpx.post(
        f"{one_slot.url}/v1/completions", json={**greedy, "prompt": left_open}, timeout=REQUEST_S
    )
    assert raw.status_code == 200, raw.text
    text = continued.json()["choices"][0]["message"]["content"]
    assert text and text == raw.json()["choices"][0]["text"]
