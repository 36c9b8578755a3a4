"""A model kept loaded: `llamachat serve --background` starts a real server process, `ps` lists
it, one-shots and `-c` on this machine answer through it instead of loading the model, and
`stop` ends it. Every server a test starts is killed at its end, whatever failed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import time

import pytest

from llamachat.processes import pid_alive
from tests.conftest import cli_env, run_cli

GREEDY = ("--temperature", "0", "--max-tokens", "12")


def stats_of(stderr: bytes) -> dict[str, str]:
    lines = stderr.decode().splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def servers(env) -> list[dict]:
    listed = run_cli("ps", "--json", env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    return json.loads(listed.stdout)


def kill_all(env) -> None:
    for server in servers(env):
        if pid_alive(server["pid"]):
            os.kill(server["pid"], signal.SIGKILL)


@pytest.fixture(scope="module")
def home(tiny_model_factory, tmp_path_factory):
    env = cli_env(tmp_path_factory.mktemp("background"))
    assert run_cli("pull", str(tiny_model_factory()[0]), "--as", "tiny", env=env).returncode == 0
    return env


@pytest.fixture(scope="module")
def started(home):
    """`serve --background` on the tiny model; what it printed, and its record from `ps`."""
    result = run_cli("serve", "--background", "-m", "tiny", "--port", "0", env=home, timeout=120)
    try:
        assert result.returncode == 0, result.stderr.decode()
        (server,) = servers(home)
        yield result, server
    finally:
        kill_all(home)


def test_background_returns_once_it_serves_and_ps_lists_what_it_loaded(home, started):
    result, server = started
    assert result.stdout == b""
    said = result.stderr.decode()
    assert f"serving tiny at {server['url']} (pid {server['pid']})" in said
    assert pid_alive(server["pid"])
    assert [model["name"] for model in server["models"]] == ["tiny"]
    assert server["models"][0]["device"] == "cpu"
    table = run_cli("ps", env=home).stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "SERVER", "PID", "DEVICE", "CONTEXT"]
    assert table[1].split()[:3] == ["tiny", server["url"], str(server["pid"])]
    # Its record and its log are the user's alone.
    run = os.path.join(home["LLAMACHAT_HOME"], "run")
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server["log"]).st_mode) == 0o600
    assert "serving tiny" in open(server["log"], encoding="utf-8").read()


def test_a_one_shot_answers_through_the_loaded_server_as_it_would_here(home, started):
    _, server = started
    through = run_cli("-m", "tiny", *GREEDY, "--verbose", env=home, input=b"hi there", timeout=60)
    assert through.returncode == 0, through.stderr.decode()
    assert f"llamachat server, pid {server['pid']}" in stats_of(through.stderr)["device"]
    here = run_cli("-m", "tiny", *GREEDY, "--local", "--verbose", env=home, input=b"hi there")
    assert here.returncode == 0
    assert "server" not in stats_of(here.stderr)["device"]
    assert through.stdout == here.stdout and through.stdout.strip()
    # The history has the model under its own name, whoever ran it.
    with sqlite3.connect(os.path.join(home["LLAMACHAT_HOME"], "history.db")) as history:
        models = {row[0] for row in history.execute("SELECT model FROM conversations")}
    assert models == {"tiny"}


def test_continuing_goes_to_the_server_and_reuses_what_it_kept(home, started):
    _, server = started
    first = run_cli("-m", "tiny", *GREEDY, env=home, input=b"one", timeout=60)
    assert first.returncode == 0
    again = run_cli("-c", *GREEDY, "--verbose", env=home, input=b"two", timeout=60)
    assert again.returncode == 0, again.stderr.decode()
    stats = stats_of(again.stderr)
    assert f"pid {server['pid']}" in stats["device"]
    assert int(stats["reused from cache"]) > 0


def test_a_flag_that_places_the_model_loads_it_here(home, started):
    result = run_cli("-m", "tiny", *GREEDY, "--device", "cpu", "--verbose", env=home, input=b"x")
    assert result.returncode == 0
    assert "server" not in stats_of(result.stderr)["device"]


def test_a_server_that_was_killed_is_passed_over_and_its_record_cleared(tmp_path, home):
    env = {**home, "LLAMACHAT_HOME": home["LLAMACHAT_HOME"]}
    result = run_cli("serve", "--background", "-m", "tiny", "--port", "0", env=env, timeout=120)
    try:
        assert result.returncode == 0, result.stderr.decode()
        killed = [s for s in servers(env) if f"(pid {s['pid']})" in result.stderr.decode()]
        (server,) = killed
        os.kill(server["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(server["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        answered = run_cli("-m", "tiny", *GREEDY, "--verbose", env=env, input=b"hi", timeout=60)
        assert answered.returncode == 0, answered.stderr.decode()
        assert f"pid {server['pid']}" not in stats_of(answered.stderr)["device"]
        assert server["pid"] not in [s["pid"] for s in servers(env)]
        assert not os.path.exists(server["log"].replace(".log", ".json"))
    finally:
        kill_all_but_first(env, result)


def kill_all_but_first(env, result) -> None:
    """Kill the server `result` started, leaving the module's own one."""
    for server in servers(env):
        if f"(pid {server['pid']})" in result.stderr.decode() and pid_alive(server["pid"]):
            os.kill(server["pid"], signal.SIGKILL)


def test_a_server_that_cannot_start_says_why_in_one_line(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--background", "--port", str(port), env=home, timeout=120)
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("llamachat: error: cannot listen on 127.0.0.1:")
    assert "Address already in use" in last


def test_stop_ends_the_server_and_ps_then_has_none(tiny_model_factory, tmp_path):
    env = cli_env(tmp_path / "stopping")
    assert run_cli("pull", str(tiny_model_factory()[0]), "--as", "tiny", env=env).returncode == 0
    result = run_cli("serve", "--background", "--port", "0", env=env, timeout=120)
    try:
        assert result.returncode == 0, result.stderr.decode()
        (server,) = servers(env)
        stopped = run_cli("stop", "tiny", env=env, timeout=60)
        assert stopped.returncode == 0, stopped.stderr.decode()
        assert f"stopped the server at {server['url']}" in stopped.stderr.decode()
        assert not pid_alive(server["pid"])
        assert servers(env) == []
        none = run_cli("stop", env=env)
        assert none.returncode == 1
        assert none.stderr.decode().strip() == "llamachat: error: no llamachat server is running"
    finally:
        kill_all(env)


def test_a_server_that_asks_for_a_key_is_used_only_with_the_key(tiny_model_factory, tmp_path):
    env = cli_env(tmp_path / "keyed", LLAMACHAT_API_KEY="kept-loaded-key")
    assert run_cli("pull", str(tiny_model_factory()[0]), "--as", "tiny", env=env).returncode == 0
    result = run_cli("serve", "--background", "--port", "0", env=env, timeout=120)
    try:
        assert result.returncode == 0, result.stderr.decode()
        (server,) = servers(env)
        assert server["key"] is True
        assert "kept-loaded-key" not in open(server["log"], encoding="utf-8").read()
        with_key = run_cli("-m", "tiny", *GREEDY, "--verbose", env=env, input=b"hi", timeout=60)
        assert f"pid {server['pid']}" in stats_of(with_key.stderr)["device"]
        without = {k: v for k, v in env.items() if k != "LLAMACHAT_API_KEY"}
        here = run_cli("-m", "tiny", *GREEDY, "--verbose", env=without, input=b"hi", timeout=60)
        assert here.returncode == 0
        assert "server" not in stats_of(here.stderr)["device"]
        assert here.stdout == with_key.stdout
    finally:
        kill_all(env)
