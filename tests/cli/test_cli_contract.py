"""What every command promises at its edges: exit codes into closed pipes, --version, and bad
values that must end in one line, not a generic error. A tiny model keeps them quick."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import cli_env, run_cli, start_cli


@pytest.fixture(scope="module")
def tiny_env(tiny_model_factory, tmp_path_factory):
    env = cli_env(tmp_path_factory.mktemp("contract"))
    folder = tiny_model_factory()[0]
    assert run_cli("pull", str(folder), "--as", "tiny", env=env).returncode == 0
    return env


def run_into_closed_pipe(*args: str, env, input: bytes = b"") -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reading end is already closed: the first write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "llamachat", *args],
            env=env,
            input=input,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args", [["ask", "Hello", "--max-tokens", "8"], ["show", "tiny"], ["config"], ["list"]]
)
def test_a_closed_output_pipe_exits_141_quietly(tiny_env, args):
    result = run_into_closed_pipe(*args, env=tiny_env)
    assert result.returncode == 141, result.stderr.decode()
    assert result.stderr == b""


def test_an_answer_cut_by_head_exits_141(tiny_env):
    pipeline = (
        f"{sys.executable} -m llamachat ask Hello --temperature 0 --max-tokens 400 | head -c 20"
        " >/dev/null; echo ${PIPESTATUS[0]}"
    )
    result = subprocess.run(
        ["bash", "-c", pipeline], env=tiny_env, capture_output=True, timeout=120
    )
    assert result.stdout.decode().strip() == "141", result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = run_cli("--version", env=cli_env_for_version())
    assert result.returncode == 0
    assert result.stdout.decode() == f"llamachat {version('llamachat')}\n"


def cli_env_for_version():
    return {**os.environ, "LLAMACHAT_HOME": "/nonexistent/llamachat-home"}


def test_a_seed_beyond_64_bits_is_a_usage_error(tiny_env):
    result = run_cli("ask", "Hi", "--seed", "18446744073709551616", env=tiny_env)
    assert result.returncode == 2, result.stderr.decode()
    (line,) = result.stderr.decode().strip().splitlines()
    assert "--seed" in line and "Traceback" not in line


def test_a_seed_beyond_64_bits_in_the_config_is_one_line(tiny_env, tmp_path):
    env = {**tiny_env, "LLAMACHAT_HOME": str(tmp_path)}
    (tmp_path / "models").symlink_to(tiny_env["LLAMACHAT_HOME"] + "/models")
    (tmp_path / "config.toml").write_text("seed = 18446744073709551616\n")
    result = run_cli("ask", "Hi", env=env)
    assert result.returncode in (1, 2), result.stderr.decode()
    (line,) = result.stderr.decode().strip().splitlines()
    assert "seed" in line and "Error:" not in line


@pytest.mark.parametrize("option", [[], ["--system"]])
def test_text_that_is_not_utf8_on_the_command_line_is_one_line(tiny_env, option):
    command = [sys.executable.encode(), b"-m", b"llamachat", b"ask", *map(str.encode, option)]
    if option:
        command += [b"caf\xe9", b"Hi"]
    else:
        command += [b"caf\xe9 au lait"]
    result = subprocess.run(command, env=tiny_env, capture_output=True, timeout=120, input=b"")
    assert result.returncode == 2, result.stderr.decode()
    (line,) = result.stderr.decode().strip().splitlines()
    assert "UTF-8" in line and "Error" not in line


def test_verbose_stats_are_printed_after_ctrl_c(tiny_env):
    process = start_cli("ask", "Hello", "--verbose", "--max-tokens", "900", env=tiny_env)
    assert process.stdout.read(1)  # the answer has started
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr
    assert "generated tokens:" in stderr and "finish:" in stderr


def test_generation_options_before_ask_apply_to_it(tiny_env):
    result = run_cli("--max-tokens", "3", "-v", "ask", "Hello", "--temperature", "0", env=tiny_env)
    assert result.returncode == 0, result.stderr.decode()
    assert re.search(r"generated tokens:\s+3\n", result.stderr.decode())
    # The command's own flag wins over the one before it.
    later = run_cli("--max-tokens", "3", "ask", "Hello", "--max-tokens", "2", "-v", env=tiny_env)
    assert re.search(r"generated tokens:\s+2\n", later.stderr.decode())


def test_generation_options_before_a_command_that_takes_none_are_refused(tiny_env):
    result = run_cli("-m", "tiny", "list", env=tiny_env)
    assert result.returncode == 2 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert "-m" in line and "list" in line
