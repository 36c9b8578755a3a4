"""CPU threads: --threads, the config's threads, and a default that leaves the cores other
processes keep busy (every step stalled when PyTorch shared a core with one)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny_env(tiny_model_factory, tmp_path_factory):
    from tests.conftest import cli_env

    env = cli_env(tmp_path_factory.mktemp("threads"))
    del env["OMP_NUM_THREADS"]  # the suite's fixed count: these tests are about the default
    assert run_cli("pull", str(tiny_model_factory()[0]), "--as", "tiny", env=env).returncode == 0
    return env


def threads_used(env, *args: str) -> int:
    result = run_cli("ask", "Hi", "--max-tokens", "2", "-v", *args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    (count,) = re.findall(r"^threads:\s+(\d+)$", result.stderr.decode(), re.MULTILINE)
    return int(count)


def physical_cores() -> int:
    """From lscpu, not from the code under test: distinct (socket, core) pairs."""
    listing = subprocess.run(["lscpu", "-p=SOCKET,CORE"], capture_output=True, text=True)
    return len({line for line in listing.stdout.splitlines() if not line.startswith("#")})


def test_the_default_is_every_physical_core_on_an_idle_machine(tiny_env):
    assert threads_used(tiny_env) == physical_cores()


def test_the_default_leaves_a_core_that_another_process_keeps_busy(tiny_env):
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads_used(tiny_env) <= max(1, physical_cores() - 1)
    finally:
        neighbour.kill()
        neighbour.wait()


def test_the_flag_and_the_config_set_the_threads(tiny_env):
    assert threads_used(tiny_env, "--threads", "2") == 2
    assert run_cli("config", "set", "threads", "3", env=tiny_env).returncode == 0
    try:
        assert threads_used(tiny_env) == 3
        assert threads_used(tiny_env, "--threads", "1") == 1
    finally:
        run_cli("config", "unset", "threads", env=tiny_env)


def test_omp_num_threads_fixes_the_default_and_the_flag_beats_it(tiny_env):
    assert threads_used({**tiny_env, "OMP_NUM_THREADS": "3"}) == 3
    assert threads_used({**tiny_env, "OMP_NUM_THREADS": "3"}, "--threads", "1") == 1


def test_zero_threads_is_a_usage_error(tiny_env):
    result = run_cli("ask", "Hi", "--threads", "0", env=tiny_env)
    assert result.returncode == 2 and b"--threads" in result.stderr


def test_the_chat_app_gets_the_threads_too(tiny_env, monkeypatch):
    from llamachat.cli.generation import app_options
    from llamachat.cli.options import GenerationOptions

    monkeypatch.setenv("LLAMACHAT_HOME", tiny_env["LLAMACHAT_HOME"])
    assert app_options(GenerationOptions(threads=3), None).threads == 3


def test_loading_a_model_sets_pytorchs_threads(tiny_model_factory):
    import torch

    from llamachat.engine import ChatModel

    before = torch.get_num_threads()
    try:
        model = ChatModel.load(tiny_model_factory()[0], device="cpu", threads=1)
        assert model.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_default_follows_a_neighbour_from_one_reply_to_the_next(
    tiny_model_factory, monkeypatch
):
    import torch

    from llamachat.engine import GREEDY, ChatModel

    monkeypatch.delenv("OMP_NUM_THREADS")
    before = torch.get_num_threads()
    cores = physical_cores()
    model = ChatModel.load(tiny_model_factory()[0], device="cpu")
    session = model.session()

    def reply() -> int:
        list(session.reply([{"role": "user", "content": "Hi"}], GREEDY, max_new_tokens=2))
        return torch.get_num_threads()

    try:
        assert model.threads == cores
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            assert reply() == model.threads <= max(1, cores - 1)
        finally:
            neighbour.kill()
            neighbour.wait()
        time.sleep(1)
        assert reply() == model.threads == cores
    finally:
        torch.set_num_threads(before)
