"""Runs llamachat with its history on a small file system that really fills up, and prints what
happened as JSON. It runs inside a private mount namespace where HOME is a small tmpfs
(tests/history/test_full_disk.py starts it under `unshare`), so nothing outside is touched and
the file system goes away with the process.

    python -m tests.history.full_disk HOME MODELS SCENARIO

The disk fills at a known point of a reply: once the reply's first piece is saved, this process
takes the database's write lock, so the writer's next save waits on it; the disk is filled to
the last byte; the lock is let go, and that save and every later one meet a full disk (SQLite's
"database or disk is full", from ENOSPC).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pty
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Tell me everything you know."
MAX_TOKENS = 200
# Greedy, with no repetition penalty: the engine's GREEDY, whatever the command's defaults.
FLAGS = ["-m", "tiny", "--device", "cpu", "--quantize", "none", "--temperature", "0"]
FLAGS += ["--repeat-penalty", "1"]
REPLY_FLAGS = [*FLAGS, "--max-tokens", str(MAX_TOKENS)]
LLAMACHAT = [sys.executable, "-m", "llamachat"]


def fill(folder: Path) -> None:
    """Write zeros into folder/filler until the file system has no byte left."""
    with open(folder / "filler", "ab", buffering=0) as filler:
        block = b"\0" * 4096
        while True:
            try:
                filler.write(block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                block = block[: len(block) // 2]
                if not block:
                    return


def free(folder: Path) -> None:
    (folder / "filler").unlink()


def fill_once_the_reply_starts(database: Path, conversation: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the reply did not start"
        time.sleep(0.01)
        try:
            reader = sqlite3.connect(database)
            row = reader.execute(
                "SELECT status, content FROM messages "
                "WHERE conversation_id = ? AND role = 'assistant'",
                (conversation,),
            ).fetchone()
            reader.close()
        except sqlite3.OperationalError:
            continue
        if row is not None and row[1]:
            break
    lock = sqlite3.connect(database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the writer's next save waits for this
    assert row[0] == "streaming", "the reply ended before the disk could fill"
    fill(database.parent)
    lock.execute("ROLLBACK")
    lock.close()


def one_shot(home: Path, env: dict[str, str]) -> dict:
    process = subprocess.Popen(
        [*LLAMACHAT, "ask", QUESTION, *REPLY_FLAGS],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    fill_once_the_reply_starts(home / "history.db", conversation=1)
    return ended(process)


def plain_chat(home: Path, env: dict[str, str]) -> dict:
    """`chat --plain` needs a terminal on stdin: a pseudo-terminal's other end types into it."""
    keyboard, terminal = pty.openpty()
    process = subprocess.Popen(
        [*LLAMACHAT, "chat", "--plain", *REPLY_FLAGS],
        env=env,
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    os.write(keyboard, f"{QUESTION}\n".encode())
    fill_once_the_reply_starts(home / "history.db", conversation=1)
    # The next line is read only once the reply has ended.
    os.write(keyboard, b"/bye\n")
    report = ended(process)
    os.close(keyboard)
    return report


async def chat_app(home: Path) -> dict:
    """The chat app, driven with the Pilot in this process; the disk fills from a thread."""
    from llamachat.backends import Sampling
    from llamachat.home import Home
    from llamachat.tui.widgets.chat_view import ReplyTurn
    from llamachat.tui.widgets.prompt_input import PromptInput
    from tests.tui.conftest import app_for, settle

    greedy = Sampling(temperature=0.0, repeat_penalty=1.0)
    app = app_for(
        Home(home, home, home / "cache"), quantize="none", sampling=greedy, max_tokens=MAX_TOKENS
    )
    async with app.run_test() as pilot:
        await settle(pilot, app)
        filling = asyncio.create_task(
            asyncio.to_thread(fill_once_the_reply_starts, home / "history.db", 1)
        )
        app.query_one(PromptInput).text = QUESTION
        await pilot.press("enter")
        await filling
        await settle(pilot, app)
        shown = [turn.text for turn in app.query(ReplyTurn)]
        notes = [(str(n.message), n.severity) for n in app._notifications]
        # The disk is still full: the next message cannot even be saved.
        app.query_one(PromptInput).text = "And then?"
        await pilot.press("enter")
        await settle(pilot, app)
        later = [(str(n.message), n.severity) for n in app._notifications][len(notes) :]
        editor = app.query_one(PromptInput).text
    return {"replies": shown, "notifications": notes, "later": later, "editor": editor}


async def chat_app_continuing(home: Path) -> dict:
    """The chat app: a reply cut by its token limit, continued (Ctrl+G) once the disk is full."""
    from llamachat.backends import Sampling
    from llamachat.home import Home
    from llamachat.tui.widgets.chat_view import ReplyTurn
    from llamachat.tui.widgets.prompt_input import PromptInput
    from tests.tui.conftest import app_for, settle

    greedy = Sampling(temperature=0.0, repeat_penalty=1.0)
    app = app_for(Home(home, home, home / "cache"), quantize="none", sampling=greedy, max_tokens=5)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        app.query_one(PromptInput).text = QUESTION
        await pilot.press("enter")
        await settle(pilot, app)
        cut = [turn.text for turn in app.query(ReplyTurn)]
        fill(home)
        await pilot.press("ctrl+g")
        await settle(pilot, app)
        shown = [turn.text for turn in app.query(ReplyTurn)]
        notes = [(str(n.message), n.severity) for n in app._notifications]
        status = str(app.query(ReplyTurn).last().border_subtitle)
        running = app.is_running
    report = {"cut": cut, "replies": shown, "notifications": notes, "status": status}
    return {**report, "running": running}


def ended(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    return outcome(process.returncode, stdout, stderr)


def llamachat(env: dict[str, str], *args: str, input: bytes = b"") -> dict:
    result = subprocess.run([*LLAMACHAT, *args], env=env, input=input, capture_output=True)
    return outcome(result.returncode, result.stdout, result.stderr)


def outcome(returncode: int, stdout: bytes, stderr: bytes) -> dict:
    return {"returncode": returncode, "stdout": stdout.decode(), "stderr": stderr.decode()}


def main() -> None:
    home, models, scenario = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (home / "models").symlink_to(models)
    env = {**os.environ, "LLAMACHAT_HOME": str(home)}
    if scenario == "opening":
        llamachat(env, "history", "list")  # a history that works, closed again
        fill(home)
        report = {
            "list": llamachat(env, "history", "list"),
            "ask": llamachat(env, *FLAGS, input=QUESTION.encode()),
        }
    else:
        if scenario == "app":
            report = asyncio.run(chat_app(home))
        elif scenario == "app-continue":
            report = asyncio.run(chat_app_continuing(home))
        else:
            report = {"one-shot": one_shot, "plain-chat": plain_chat}[scenario](home, env)
        free(home)  # to read what the history kept
        report["saved"] = json.loads(llamachat(env, "history", "show", "1", "--json")["stdout"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
