"""Every example in README.md ends, in bounded time, the way the README says: each command line
of its sh and console blocks runs through the installed `llamachat` command, in README order,
in a home where SmolLM2 is installed, and the Python example runs as written.

The install and test commands are left out: CI runs them itself (`.ci/run`). No Hub is
reachable here, so the examples that pull from it must end with the one-line error that says
so, as must the one that needs a terminal and those naming the user's own files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smollm2

README = Path(__file__).resolve().parents[1] / "README.md"
LIMIT_S = 300  # per example: generous for a loaded 2-core machine, still bounded
# Examples that cannot succeed here, with the exit code they must end with.
EXPECTED_FAILURES = {
    "llamachat pull tinyllama": 1,  # the Hub
    "llamachat pull 8b-instruct": 1,
    "llamachat pull hf:": 1,
    "llamachat pull ./my-finetune": 1,  # the user's own files
    "llamachat pull ./model.Q4_K_M.gguf": 1,
    "llamachat create french -f Chatfile": 2,  # a Chatfile of the user's (a usage error)
    "--adapter ./my-lora": 1,  # the user's own adapter
    "-m tinyllama": 1,  # pulled above, which cannot happen here
    "llamachat pull 70b-chat": 1,  # the Hub
    "-m 70b-chat --gpus": 1,  # pulled above, and 4 GPUs
    "llamachat chat": 2,  # needs a terminal
    "vllm serve": 127,  # needs vLLM and its GPUs (not installed here: "command not found")
    "-m cluster/llama-70b": 1,  # a cluster this machine cannot reach
}
# What CI runs itself.
NOT_EXAMPLES = ("pip install", "python -m pytest")


def blocks(*languages: str) -> list[tuple[str, str]]:
    """(language, text) of README's fenced blocks in those languages, in document order."""
    pattern = rf"^```({'|'.join(languages)})\n(.*?)^```"
    return re.findall(pattern, README.read_text(), re.DOTALL | re.MULTILINE)


def command_lines() -> list[str]:
    """Each command line a user would type, in README order (console blocks: the `$ ` lines)."""
    lines = []
    for language, text in blocks("sh", "console"):
        for line in text.splitlines():
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if shlex.split(line, comments=True) and not any(n in line for n in NOT_EXAMPLES):
                lines.append(line)
    return lines


def expected_exit(command: str) -> int:
    return next((code for part, code in EXPECTED_FAILURES.items() if part in command), 0)


@pytest.fixture(scope="module")
def readme_home(smollm2_env, tmp_path_factory):
    """A user's home with SmolLM2 installed (the shared install's files, hard-linked: the
    examples install models of their own), notes.txt in the folder the examples run in, and no
    Hub within reach (a port nothing listens on)."""
    root = tmp_path_factory.mktemp("readme")
    home = root / "llamachat"
    home.mkdir()
    shared = Path(smollm2_env["LLAMACHAT_HOME"]) / "models"
    shutil.copytree(shared, home / "models", copy_function=os.link, symlinks=True)
    work = root / "work"
    work.mkdir()
    (work / "notes.txt").write_text("Paris is the capital of France.\n")
    bin_dir = Path(sys.executable).parent
    assert shutil.which("llamachat", path=str(bin_dir)), "the llamachat command is not installed"
    env = {
        **smollm2_env,
        "LLAMACHAT_HOME": str(home),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    return env, work


def test_the_readme_has_examples_to_run():
    commands = command_lines()
    assert len(commands) >= 15, commands
    assert any("用一句话介绍长城" in c for c in commands)
    assert blocks("python")


def test_every_readme_command_ends_as_the_readme_says(readme_home):
    env, work = readme_home
    for command in command_lines():
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=LIMIT_S,
        )
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == expected_exit(command), (command, stderr)
        assert "Traceback" not in stderr, (command, stderr)
        if result.returncode:
            assert len(stderr.strip().splitlines()) == 1, (command, stderr)


def test_the_readme_python_example_runs_as_written(readme_home, tmp_path):
    env, _ = readme_home
    data = tmp_path / ".local" / "share" / "llamachat"
    data.mkdir(parents=True)
    (data / "models").symlink_to(Path(env["LLAMACHAT_HOME"]) / "models")
    ((_, code),) = blocks("python")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "HOME": str(tmp_path)},
        capture_output=True,
        timeout=LIMIT_S,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert "GenerationStats(" in result.stdout.decode()
