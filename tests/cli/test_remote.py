"""Chatting with a model on a remote server (`llamachat remote`, `-m NAME/MODEL`): a real
`llamachat serve` subprocess on 127.0.0.1 with an API key, reached from another llamachat home
that has no model installed."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat

import pytest

from tests.conftest import cli_env, run_cli, start_cli
from tests.server.conftest import start_server

KEY = "remote-test-key"
GREEDY = ("--temperature", "0", "--max-tokens", "12")


@pytest.fixture(scope="module")
def served(tiny_model_factory, tmp_path_factory):
    """The tiny model served with a key; and the home it was installed in."""
    home = cli_env(tmp_path_factory.mktemp("remote-server"))
    folder = tiny_model_factory()[0]
    assert run_cli("pull", str(folder), "--as", "tiny", env=home).returncode == 0
    server = start_server(home, "--max-batch", "2", api_key=KEY)
    yield server, home
    server.stop()


@pytest.fixture(scope="module")
def client_home(served, tmp_path_factory):
    """A home with the server added as remote `box`, its key in BOX_KEY."""
    server, _ = served
    env = cli_env(tmp_path_factory.mktemp("remote-client"), BOX_KEY=KEY)
    added = run_cli("remote", "add", "box", server.url, "--api-key-env", "BOX_KEY", env=env)
    assert added.returncode == 0, added.stderr.decode()
    return env


def test_a_remote_is_added_listed_and_kept_private_without_its_key(client_home, served):
    server, _ = served
    listed = run_cli("remote", "list", env=client_home)
    assert listed.returncode == 0
    assert listed.stdout.decode().split() == ["box", f"{server.url}/v1", "key", "from", "$BOX_KEY"]
    path = os.path.join(client_home["LLAMACHAT_HOME"], "remotes.toml")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert KEY not in open(path, encoding="utf-8").read()


def test_a_piped_question_is_answered_by_the_remote_model_as_it_is_here(client_home, served):
    _, server_home = served
    there = run_cli("-m", "box/tiny", *GREEDY, env=client_home, input=b"hello there", timeout=120)
    assert there.returncode == 0, there.stderr.decode()
    here = run_cli(
        "-m", "tiny", *GREEDY, "--local", env=server_home, input=b"hello there", timeout=120
    )
    assert here.returncode == 0
    assert there.stdout == here.stdout and there.stdout.strip()
    assert there.stderr == b""  # stdout is for the answer; nothing else was said
    # The exchange is in the client's own history, under the remote model's name.
    db = os.path.join(client_home["LLAMACHAT_HOME"], "history.db")
    with sqlite3.connect(db) as history:
        models = [row[0] for row in history.execute("SELECT model FROM conversations")]
    assert models == ["box/tiny"]


def test_a_continued_conversation_goes_to_the_remote_and_reuses_its_cache(client_home):
    first = run_cli("-m", "box/tiny", *GREEDY, env=client_home, input=b"one", timeout=120)
    assert first.returncode == 0
    again = run_cli("-c", *GREEDY, "--verbose", env=client_home, input=b"two", timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    stats = dict(line.split(":", 1) for line in again.stderr.decode().splitlines() if ":" in line)
    assert "remote" in stats["device"]
    assert int(stats["reused from cache"]) > 0  # the server kept the first turn's keys


def test_a_key_kept_in_a_private_file_is_used_and_one_others_can_read_is_refused(served, tmp_path):
    server, _ = served
    env = cli_env(tmp_path / "file-client")
    key_file = tmp_path / "box.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    refused = run_cli("remote", "add", "box", server.url, "--api-key-file", str(key_file), env=env)
    assert refused.returncode == 2
    assert refused.stderr.decode().strip() == (
        f"llamachat: error: the key file {key_file} may be read by others: chmod 600 {key_file}"
    )
    key_file.chmod(0o600)
    added = run_cli("remote", "add", "box", server.url, "--api-key-file", str(key_file), env=env)
    assert added.returncode == 0, added.stderr.decode()
    listed = run_cli("remote", "list", env=env).stdout.decode()
    assert listed.split() == ["box", f"{server.url}/v1", "key", "from", str(key_file)]
    remotes_toml = os.path.join(env["LLAMACHAT_HOME"], "remotes.toml")
    assert KEY not in open(remotes_toml, encoding="utf-8").read()
    answered = run_cli("-m", "box/tiny", *GREEDY, env=env, input=b"hi", timeout=120)
    assert answered.returncode == 0, answered.stderr.decode()
    assert answered.stdout.strip()
    key_file.chmod(0o640)  # loosened since: the key is not sent
    loose = run_cli("-m", "box/tiny", *GREEDY, env=env, input=b"hi", timeout=60)
    assert loose.returncode == 1
    (line,) = loose.stderr.decode().strip().splitlines()
    assert line.endswith(f"may be read by others: chmod 600 {key_file}")


@pytest.mark.parametrize(
    ("args", "env_extra", "expected"),
    [
        (("-m", "box/nope"), {}, "box has no model 'nope' (it serves: tiny)"),
        (("-m", "box/tiny"), {"BOX_KEY": "not-the-key-123"}, "box refused the API key"),
    ],
    ids=["unknown-model", "wrong-key"],
)
def test_a_refusal_is_one_line(client_home, args, env_extra, expected):
    result = run_cli(*args, env={**client_home, **env_extra}, input=b"hi", timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert expected in line
    assert KEY not in line and "not-the-key-123" not in line  # no key is ever repeated


def test_a_server_that_is_gone_is_said_in_one_line(tmp_path, tiny_model_factory):
    home = cli_env(tmp_path / "gone-server")
    assert run_cli("pull", str(tiny_model_factory()[0]), "--as", "tiny", env=home).returncode == 0
    server = start_server(home)
    url = server.url
    try:
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.stop(signal.SIGKILL)  # never left running, whatever failed
    env = cli_env(tmp_path / "gone-client")
    assert run_cli("remote", "add", "gone", url, env=env).returncode == 0
    result = run_cli("-m", "gone/tiny", env=env, input=b"hi", timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert f"cannot reach gone at {url}/v1: connection refused" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("remote", "add", "a/b", "http://x"), "remote name 'a/b'"),
        (("remote", "add", "x", "ftp://x"), "remote URL 'ftp://x'"),
        (("remote", "add", "x", "http://[::1"), "remote URL 'http://[::1'"),
        (("remote", "add", "x", "http://x:99999"), "remote URL 'http://x:99999'"),
        (("remote", "add", "x", "http://user:secret@x"), "may have no user, password"),
        (("remote", "rm", "never"), "no remote named 'never'"),
    ],
)
def test_bad_remote_arguments_are_usage_errors(tmp_path, args, expected):
    result = run_cli(*args, env=cli_env(tmp_path))
    assert result.returncode == 2
    (line,) = result.stderr.decode().strip().splitlines()
    assert expected in line and "secret" not in line


def test_what_a_server_says_in_an_error_is_printed_as_one_safe_line():
    from llamachat.backends.remote import _refused
    from llamachat.remotes import Remote

    hostile = (
        '{"error": {"message": "bad\\u001b[2J\\u001b]0;owned\\u0007\\nsecond line'
        + "x" * 900
        + '"}}'
    )
    said = str(_refused(Remote("box", "http://box/v1"), 500, hostile))
    assert "\x1b" not in said and "\x07" not in said and "\n" not in said
    assert "bad\\x1b[2J" in said and len(said) < 400


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, '{"error": "Unauthorized"}', "box refused the API key (Unauthorized)"),  # vLLM
        (404, '{"object": "error", "message": "no such model"}', "box: no such model"),  # old vLLM
        (503, '{"error": {"message": "Loading model", "code": 503}}', "box is busy (Loading"),
    ],
    ids=["bare-string", "flat", "llama.cpp-loading"],
)
def test_the_error_shapes_servers_use_are_all_read(status, body, expected):
    from llamachat.backends.remote import _refused
    from llamachat.remotes import Remote

    assert expected in str(_refused(Remote("box", "http://box/v1"), status, body))


def test_a_server_that_never_answers_is_given_up_on_with_the_limit_named(tmp_path):
    import socket

    with socket.socket() as silent:  # takes connections, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = cli_env(tmp_path)
        assert run_cli("remote", "add", "mute", url, env=env).returncode == 0
        result = run_cli("-m", "mute/any", env=env, input=b"hi", timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert line.endswith(f"mute ({url}/v1) did not answer within 10 s")


def test_list_and_show_give_a_remotes_models_as_its_server_reports_them(client_home, served):
    import json

    import httpx

    server, _ = served
    cards = httpx.get(
        f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ).json()["data"]
    (card,) = cards
    window = card["max_model_len"]
    # A second remote that is down is said on stderr; the first one's models are still listed.
    down = {**client_home}
    assert run_cli("remote", "add", "down", "http://127.0.0.1:9", env=down).returncode == 0
    try:
        listed = run_cli("list", "--json", env=down, timeout=60)
        assert listed.returncode == 0, listed.stderr.decode()
        (entry,) = [e for e in json.loads(listed.stdout) if e["status"] == "remote"]
        assert (entry["name"], entry["context_length"]) == ("box/tiny", window)
        assert entry["source"] == f"{server.url}/v1"
        (warning,) = listed.stderr.decode().strip().splitlines()
        assert "cannot reach down" in warning
        table = run_cli("list", env=down, timeout=60).stdout.decode()
        (row,) = [line.split() for line in table.splitlines() if line.startswith("box/tiny")]
        assert row[4:] == [str(window), f"{server.url}/v1", "remote"]
    finally:
        assert run_cli("remote", "rm", "down", env=down).returncode == 0
    shown = run_cli("show", "box/tiny", "--json", env=client_home, timeout=60)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["context_length"] == window
    missing = run_cli("show", "box/nope", env=client_home, timeout=60)
    assert missing.returncode == 1
    assert "box has no model 'nope' (it serves: tiny)" in missing.stderr.decode()


def test_ctrl_c_stops_a_remote_reply_at_once_and_keeps_what_came(client_home, served):
    server, _ = served
    generated = server.metric("llamachat_generated_tokens_total")
    process = start_cli(
        "-m", "box/tiny", "--max-tokens", "900", env=client_home, input=b"go on for long"
    )
    assert process.stdout.read(1)  # the answer has started
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert b"Traceback" not in process.stderr.read()
    db = os.path.join(client_home["LLAMACHAT_HOME"], "history.db")
    with sqlite3.connect(db) as history:
        content, status = history.execute(
            "SELECT content, status FROM messages WHERE role = 'assistant' ORDER BY id DESC"
        ).fetchone()
    assert status == "interrupted" and content
    # The server let the reply go: it was cancelled there, not written to its end.
    import time

    deadline = time.monotonic() + 30
    while server.metric("llamachat_batch_running") != 0:
        assert time.monotonic() < deadline, "the server still writes the abandoned reply"
        time.sleep(0.2)
    assert server.metric("llamachat_generated_tokens_total") == generated  # none finished
