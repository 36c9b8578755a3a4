"""A remote that fails under a reply, for real: a `llamachat serve` with one slot and no waiting
room (a second client gets 503 with Retry-After), and one killed mid-stream. The tiny model has
a 16k window here, so a reply to all of it takes many seconds."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from tests.conftest import cli_env, run_cli, start_cli
from tests.server.conftest import REQUEST_S, start_server

LONG_CTX = 16384
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def long_home(tiny_model_factory, tmp_path_factory):
    env = cli_env(tmp_path_factory.mktemp("remote-failures"))
    folder = tiny_model_factory(max_position_embeddings=LONG_CTX)[0]
    assert run_cli("pull", str(folder), "--as", "long", env=env).returncode == 0
    return env


@pytest.fixture(scope="module")
def one_slot(long_home):
    served = start_server(long_home, "--ctx", str(LONG_CTX), "--max-batch", "1", "--max-queue", "0")
    yield served
    served.stop()


def client_of(server, tmp_path) -> dict[str, str]:
    env = cli_env(tmp_path / "client")
    assert run_cli("remote", "add", "box", server.url, env=env).returncode == 0
    return env


def hold_the_slot(server):
    """A streamed reply to the whole window, started: it holds the only slot until closed."""
    stream = server.client().chat.completions.create(
        model="long", messages=HI, stream=True, max_tokens=LONG_CTX - 64, temperature=0
    )
    next(iter(stream))
    return stream


def wait_until_idle(server) -> None:
    deadline = time.monotonic() + REQUEST_S
    while server.metric("llamachat_requests_running") != 0:
        assert time.monotonic() < deadline, "the cancelled reply still runs"
        time.sleep(0.1)


def last_reply(env) -> tuple[str, str]:
    with sqlite3.connect(os.path.join(env["LLAMACHAT_HOME"], "history.db")) as history:
        return history.execute(
            "SELECT content, status FROM messages WHERE role = 'assistant' ORDER BY id DESC"
        ).fetchone()


def test_a_full_server_is_asked_again_as_it_says_then_given_up_on(one_slot, tmp_path):
    env = client_of(one_slot, tmp_path)
    stream = hold_the_slot(one_slot)
    try:
        started = time.monotonic()
        result = run_cli("-m", "box/long", env=env, input=b"hello", timeout=60)
        waited = time.monotonic() - started
    finally:
        stream.close()
    wait_until_idle(one_slot)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert line.startswith("llamachat: error: box is busy (") and "try again later" in line
    assert waited >= 3  # three more asks, a second apart as its Retry-After said
    # What the user typed is kept in the history, unanswered, to continue from.
    with sqlite3.connect(os.path.join(env["LLAMACHAT_HOME"], "history.db")) as history:
        (question,) = history.execute("SELECT content FROM messages WHERE role = 'user'")
    assert question == ("hello",)


def test_a_server_that_frees_up_while_asked_again_answers(one_slot, tmp_path):
    env = client_of(one_slot, tmp_path)
    stream = hold_the_slot(one_slot)
    process = start_cli("-m", "box/long", "--max-tokens", "5", env=env, input=b"hello")
    try:
        time.sleep(1.5)  # refused once at least, and waiting to ask again
    finally:
        stream.close()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert out.strip() and err == b""
    assert last_reply(env)[1] == "length"


def test_a_server_killed_mid_reply_leaves_the_partial_reply_kept_and_marked(long_home, tmp_path):
    server = start_server(long_home, "--ctx", str(LONG_CTX))
    try:
        env = client_of(server, tmp_path)
        process = start_cli(
            "-m", "box/long", "--max-tokens", "15000", env=env, input=b"go on for long"
        )
        first = process.stdout.read(1)  # the answer has started
        assert first
        server.stop(signal.SIGKILL)
        out = first + process.stdout.read()  # to its end: the command exits
        err = process.stderr.read()
        process.wait(timeout=60)
    finally:
        server.stop(signal.SIGKILL)
    assert process.returncode == 1
    (line,) = err.decode().strip().splitlines()
    assert line.startswith("llamachat: error: the reply from box broke off")
    content, status = last_reply(env)
    assert status == "error" and content
    assert out.decode().startswith(content)  # kept: all that was printed before the break
