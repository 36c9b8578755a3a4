"""The real `llamachat` command in a real terminal (tmux), with the real SmolLM2."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.smollm2


class Tmux:
    def __init__(self, name: str):
        self.socket = ["tmux", "-L", name]
        self.name = name

    def start(self, command: str, width: int = 120, height: int = 36) -> None:
        subprocess.run(
            [
                *self.socket,
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                str(width),
                "-y",
                str(height),
                command,
            ],
            check=True,
        )

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.socket, "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        result = subprocess.run(
            [*self.socket, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        )
        return result.stdout

    def wait_for(self, predicate, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"timed out; the screen shows:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run([*self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.fail("tmux is required for the terminal test (.ci/run installs it)")
    session = Tmux(f"llamachat-test-{os.getpid()}")
    yield session
    session.kill()


def test_type_a_question_see_the_reply_quit_and_find_it(smollm2_env, tmp_path, tmux):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(Path(smollm2_env["LLAMACHAT_HOME"]) / "models")
    env = {**smollm2_env, "LLAMACHAT_HOME": str(home), "TERM": "xterm-256color"}
    # The terminal's own size: not the width set for piped output, nor what pytest sets.
    for size in ("COLUMNS", "LINES"):
        env.pop(size, None)
    exports = " ".join(
        f"{key}={shlex.quote(value)}" for key, value in env.items() if key.isidentifier()
    )
    command = (
        f"env -u COLUMNS -u LINES {exports} {shlex.quote(sys.executable)} -m llamachat "
        "--temperature 0 --max-tokens 24"
    )
    tmux.start(f"{command}; echo EXITED $?; sleep 60")

    tmux.wait_for(lambda screen: "smollm2 · cpu" in screen and "Message (Enter sends" in screen)
    tmux.keys("What is the capital of France?", "Enter")
    screen = tmux.wait_for(lambda screen: "tok/s" in screen)
    assert "What is the capital of France?" in screen, screen
    tmux.keys("C-q")
    tmux.wait_for(lambda screen: "EXITED 0" in screen, timeout=30)

    found = run_cli("history", "search", "capital of France", "--json", env=env)
    assert found.returncode == 0, found.stderr.decode()
    (hit,) = [hit for hit in json.loads(found.stdout) if hit["role"] == "user"]
    shown = json.loads(
        run_cli("history", "show", str(hit["conversation_id"]), "--json", env=env).stdout
    )
    reply = shown["messages"][-1]
    assert reply["role"] == "assistant" and reply["status"] == "complete" and reply["content"]
    first_words = " ".join(reply["content"].split()[:3])
    assert first_words in screen.replace("\n", " ") or first_words in " ".join(screen.split())
