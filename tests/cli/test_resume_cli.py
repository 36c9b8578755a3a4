"""Instant resume from the command line: a one-shot answer leaves its conversation's KV cache
in the home's kv/ folder, and `-c` in a new process loads it (the stats say the tokens reused)
and answers byte for byte as a full prefill does; a damaged file is ignored with the same
answer; `history list` shows the cache's size, `cache` lists and `cache clear` removes them;
`kv_disk_budget 0` saves nothing."""

from __future__ import annotations

import json
import os
import pty
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llamachat.history.store import HistoryStore
from tests.cli.test_oneshot import engine_answer
from tests.conftest import run_cli

pytestmark = pytest.mark.smollm2

# Long enough that prefilling it on a CPU takes longer than loading its cache (kv_files.py's
# rule): some 400 tokens.
LONG = "The river bends past the old mill, where the miller counts his sacks of grain. " * 24
ASK = ("--temperature", "0", "--max-tokens", "16", "--verbose")


@pytest.fixture
def env(smollm2_env, tmp_path):
    """A home of its own (history, saved caches) with the session's SmolLM2 in it."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "smollm2").symlink_to(Path(smollm2_env["LLAMACHAT_HOME"]) / "models/smollm2")
    return {**smollm2_env, "LLAMACHAT_HOME": str(home)}


def kv_files(env) -> list[Path]:
    return sorted((Path(env["LLAMACHAT_HOME"]) / "kv").glob("*.safetensors"))


def reused(stderr: bytes) -> int:
    return int(re.search(rb"reused from cache:\s+(\d+)", stderr)[1])


def answered_as_a_full_prefill(env, model, stdout: bytes) -> None:
    (conversation,) = HistoryStore(Path(env["LLAMACHAT_HOME"]) / "history.db").conversations()
    messages = HistoryStore(Path(env["LLAMACHAT_HOME"]) / "history.db").get(conversation.id)
    asked = messages.chat_messages()[:-1]  # what the last answer answered
    assert stdout == engine_answer(model, asked, 16)


def test_continue_in_a_new_process_loads_the_saved_cache_and_answers_the_same(env, smollm2_default):
    first = run_cli(*ASK, env=env, input=f"Summarise this: {LONG}".encode())
    assert first.returncode == 0, first.stderr.decode()
    assert reused(first.stderr) == 0
    (saved,) = kv_files(env)
    assert saved.name.startswith("1-")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    os.utime(saved, (1_000_000, 1_000_000))  # long unused: a load marks it used

    second = run_cli("-c", *ASK, env=env, input=b"And in one word?")
    assert second.returncode == 0, second.stderr.decode()
    assert reused(second.stderr) > 300  # the first exchange, from the file
    assert saved.stat().st_mtime > 1_000_000
    answered_as_a_full_prefill(env, smollm2_default, second.stdout)

    listed = run_cli("history", "list", env=env).stdout.decode()
    assert "KV CACHE" in listed and " MB" in listed
    (entry,) = json.loads(run_cli("history", "list", "--json", env=env).stdout)
    assert entry["kv_cache_bytes"] == saved.stat().st_size


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_cache_is_ignored_and_the_answer_is_the_same(env, smollm2_default, damage):
    assert run_cli(*ASK, env=env, input=f"Summarise this: {LONG}".encode()).returncode == 0
    (saved,) = kv_files(env)
    data = bytearray(saved.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) // 3]
    saved.write_bytes(bytes(data))
    result = run_cli("-c", *ASK, env=env, input=b"And in one word?")
    assert result.returncode == 0, result.stderr.decode()
    assert reused(result.stderr) == 0
    answered_as_a_full_prefill(env, smollm2_default, result.stdout)


def test_cache_lists_and_clear_removes_every_saved_cache(env):
    assert run_cli(*ASK, env=env, input=f"Summarise this: {LONG}".encode()).returncode == 0
    (saved,) = kv_files(env)
    listed = run_cli("cache", env=env)
    assert listed.returncode == 0
    assert saved.name in listed.stdout.decode()
    assert "1 saved" in listed.stderr.decode()
    (entry,) = json.loads(run_cli("cache", "list", "--json", env=env).stdout)
    assert entry["conversation"] == 1 and entry["size"] == saved.stat().st_size
    cleared = run_cli("cache", "clear", env=env)
    assert cleared.returncode == 0 and cleared.stdout == b""
    assert re.fullmatch(rb"removed 1 saved caches, [\d.]+ MB freed\n", cleared.stderr)
    assert kv_files(env) == []
    assert json.loads(run_cli("cache", "list", "--json", env=env).stdout) == []


def test_a_budget_of_zero_saves_nothing_and_a_bad_budget_is_refused(env):
    assert run_cli("config", "set", "kv_disk_budget", "0", env=env).returncode == 0
    assert run_cli(*ASK, env=env, input=f"Summarise this: {LONG}".encode()).returncode == 0
    assert kv_files(env) == []
    refused = run_cli("config", "set", "kv_disk_budget", "lots", env=env)
    assert refused.returncode == 2
    assert refused.stderr.decode().count("\n") == 1 and "not a size" in refused.stderr.decode()


def test_the_line_chat_saves_the_conversation_when_it_ends(env):
    """`chat --plain` on a terminal (a pseudo-terminal here), /bye: the cache is saved."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "llamachat", "chat", "--plain", "--temperature", "0",
         "--max-tokens", "8"],
        env=env,
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(terminal)
    os.write(controller, f"Summarise this: {LONG}\n/bye\n".encode())
    try:
        out, err = process.communicate(timeout=300)
    finally:
        os.close(controller)
    assert process.returncode == 0, err.decode()
    (saved,) = kv_files(env)
    assert saved.name.startswith("1-")
