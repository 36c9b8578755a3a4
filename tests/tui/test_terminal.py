"""The real `llamachat` command in a real terminal (tmux), with the real SmolLM2 and tiny models."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamachat.history.store import HistoryStore
from llamachat.models.pull import pull
from llamachat.models.store import ModelStore
from tests.conftest import cli_env, run_cli

QUIT_BOUND_S = 10  # generous: the check is that quitting does not wait for the reply to end


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


_SERVERS = itertools.count()


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.fail("tmux is required for the terminal test (.ci/run installs it)")
    # A server of its own per test: a new one on the socket of the last test's, which may still
    # be shutting down after kill-server, can die at start on a busy machine.
    session = Tmux(f"llamachat-test-{os.getpid()}-{next(_SERVERS)}")
    yield session
    session.kill()


@pytest.fixture(scope="module")
def long_writer(tiny_model_factory, tmp_path_factory) -> Path:
    """A models folder with `long`: a tiny model with room for 16k tokens, which greedy decoding
    fills without ever ending (it keeps the app writing for many seconds)."""
    root = tmp_path_factory.mktemp("long-writer")
    folder, _ = tiny_model_factory(max_position_embeddings=16384)
    pull(str(folder), ModelStore(root / "models"), root / "cache", name="long")
    return root / "models"


def terminal_env(base: dict[str, str], home: Path, models: Path) -> dict[str, str]:
    """`base` with its own LLAMACHAT_HOME (sharing `models`), for a real terminal."""
    home.mkdir()
    (home / "models").symlink_to(models)
    env = {**base, "LLAMACHAT_HOME": str(home), "TERM": "xterm-256color"}
    # The terminal's own size: not the width set for piped output, nor what pytest sets.
    for size in ("COLUMNS", "LINES"):
        env.pop(size, None)
    return env


def llamachat_line(env: dict[str, str], *args: str) -> str:
    """A shell line that runs `llamachat ARGS` with `env`, then says how it exited."""
    exports = " ".join(
        f"{key}={shlex.quote(value)}" for key, value in env.items() if key.isidentifier()
    )
    command = f"env -u COLUMNS -u LINES {exports} {shlex.quote(sys.executable)} -m llamachat"
    return f"{command} {shlex.join(args)}; echo EXITED $?; sleep 60"


def wait_until(predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.smollm2
def test_type_a_question_see_the_reply_quit_and_find_it(smollm2_env, tmp_path, tmux):
    models = Path(smollm2_env["LLAMACHAT_HOME"]) / "models"
    env = terminal_env(smollm2_env, tmp_path / "home", models)
    tmux.start(llamachat_line(env, "--temperature", "0", "--max-tokens", "40"))

    tmux.wait_for(lambda screen: "smollm2 · cpu" in screen and "Message (Enter sends" in screen)
    tmux.keys("Say hello.", "Enter")
    screen = tmux.wait_for(lambda screen: "tok/s" in screen)
    assert "Say hello." in screen, screen
    tmux.keys("C-q")
    tmux.wait_for(lambda screen: "EXITED 0" in screen, timeout=30)

    found = run_cli("history", "search", "Say hello", "--json", env=env)
    assert found.returncode == 0, found.stderr.decode()
    (hit,) = [hit for hit in json.loads(found.stdout) if hit["role"] == "user"]
    shown = json.loads(
        run_cli("history", "show", str(hit["conversation_id"]), "--json", env=env).stdout
    )
    reply = shown["messages"][-1]
    assert reply["role"] == "assistant" and reply["status"] == "complete" and reply["content"]
    first_words = " ".join(reply["content"].split()[:3])
    assert first_words in screen.replace("\n", " ") or first_words in " ".join(screen.split())


@pytest.mark.parametrize("key", ["C-q", "C-c"])
def test_quitting_while_a_reply_streams_exits_at_once_and_keeps_the_reply(
    long_writer, tmp_path, tmux, key
):
    env = terminal_env(cli_env(tmp_path), tmp_path / "home", long_writer)
    args = ("-m", "long", "--device", "cpu", "--temperature", "0", "--ctx", "16384")
    tmux.start(llamachat_line(env, *args, "--max-tokens", "16000"))
    tmux.wait_for(lambda screen: "long · cpu" in screen and "Message (Enter sends" in screen)
    tmux.keys("Tell me everything", "Enter")
    history = HistoryStore(tmp_path / "home" / "history.db")

    def reply_begun():
        conversations = history.conversations()
        messages = history.get(conversations[0].id).messages if conversations else ()
        return messages[-1] if messages and messages[-1].content else None

    reply = wait_until(reply_begun)
    assert reply.role == "assistant" and reply.status == "streaming"
    tmux.keys(key)
    screen = tmux.wait_for(lambda screen: "EXITED" in screen, timeout=QUIT_BOUND_S)
    assert "EXITED 0" in screen and "Traceback" not in screen, screen
    (saved,) = [m for m in history.get(history.latest().id).messages if m.id == reply.id]
    assert saved.status == "interrupted"
    assert saved.content.startswith(reply.content)
    assert 0 < saved.generated_tokens < 16000


@pytest.mark.parametrize(
    "bad_value", ['primary = "notacolor"', 'primary = "#123456"\ndark = "yes"']
)
def test_a_saved_bad_theme_no_longer_stops_the_app(long_writer, tmp_path, tmux, bad_value):
    home = tmp_path / "home"
    env = terminal_env(cli_env(tmp_path), home, long_writer)
    (home / "themes").mkdir()
    (home / "themes" / "bad.toml").write_text(f'name = "bad"\n{bad_value}\n')
    (home / "config.toml").write_text('theme = "bad"\n')
    tmux.start(llamachat_line(env, "-m", "long", "--device", "cpu"))
    screen = tmux.wait_for(lambda screen: "long · cpu" in screen or "EXITED" in screen)
    assert "Message (Enter sends" in screen and "bad.toml" in screen, screen
    tmux.keys("C-q")
    screen = tmux.wait_for(lambda screen: "EXITED" in screen, timeout=QUIT_BOUND_S)
    assert "EXITED 0" in screen and "Traceback" not in screen, screen
    assert (home / "config.toml").read_text() == 'theme = "bad"\n'  # kept for when it is fixed


def test_up_takes_the_last_message_back_with_the_cursor_at_its_end(long_writer, tmp_path, tmux):
    env = terminal_env(cli_env(tmp_path), tmp_path / "home", long_writer)
    tmux.start(llamachat_line(env, "-m", "long", "--device", "cpu", "--max-tokens", "8"))
    tmux.wait_for(lambda screen: "long · cpu" in screen and "Message (Enter sends" in screen)
    tmux.keys("Hello there", "Enter")
    tmux.wait_for(lambda screen: "tok/s" in screen)
    tmux.keys("Up")
    tmux.wait_for(lambda screen: "Hello there " in editor_row(screen), timeout=QUIT_BOUND_S)
    # Two sends: tmux writes keys of one call at once, and Textual reads Backspace and a
    # character that arrive together as something else.
    tmux.keys("BSpace")  # at the end: the last letter goes...
    tmux.wait_for(lambda screen: "Hello ther " in editor_row(screen), timeout=QUIT_BOUND_S)
    tmux.keys("!")  # ...and what is typed follows
    tmux.wait_for(lambda screen: "Hello ther! " in editor_row(screen), timeout=QUIT_BOUND_S)


def editor_row(screen: str) -> str:
    """The first row of the editor, under its border saying that a message is being edited."""
    rows = screen.splitlines()
    titled = [index for index, row in enumerate(rows) if "editing your message" in row]
    return rows[titled[0] + 1] if titled else ""
