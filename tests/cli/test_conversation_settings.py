"""A conversation's own settings: set with `history set`, shown by `history show`, kept in the
history, and used when it is continued with -c, under the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamachat.history.store import HistoryStore
from tests.conftest import run_cli


@pytest.fixture
def store(env, tiny_store) -> HistoryStore:
    history = HistoryStore(Path(env["LLAMACHAT_HOME"]) / "history.db")
    (Path(env["LLAMACHAT_HOME"]) / "models").symlink_to(tiny_store.root)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Count with me")
    history.add_message(conversation, "assistant", "one two")
    return history


def test_set_then_show_and_json_carry_them(env, store):
    done = run_cli("history", "set", "1", "--temperature", "0.3", "--max-tokens", "4", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b""
    assert "temperature 0.3, max_tokens 4" in done.stderr.decode()
    printed = run_cli("history", "set", "1", env=env).stdout.decode()
    assert printed.strip() == "temperature 0.3, max_tokens 4"
    shown = run_cli("history", "show", "1", env=env).stdout.decode()
    assert "*Its own settings: temperature 0.3, max_tokens 4*" in shown
    data = json.loads(run_cli("history", "show", "1", "--json", env=env).stdout)
    assert data["settings"] == {"max_tokens": 4, "temperature": 0.3}
    unset = run_cli("history", "set", "1", "--unset", "temperature", env=env)
    assert unset.returncode == 0
    assert store.get(1).settings.chosen() == {"max_tokens": 4}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--unset", "colour"], "no setting 'colour'"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(env, store, args, line):
    refused = run_cli("history", "set", "1", *args, env=env)
    assert refused.returncode == 2
    (said,) = refused.stderr.decode().strip().splitlines()
    assert line in said
    assert store.get(1).settings.chosen() == {}  # nothing written


def test_continue_takes_the_conversations_own_settings_under_the_flags(env, store):
    run_cli("history", "set", "1", "--temperature", "0", "--max-tokens", "2", env=env)
    flags = ["-m", "tiny", "--device", "cpu"]
    own = run_cli("-c", *flags, env=env, input=b"three")
    assert own.returncode == 0, own.stderr.decode()
    assert store.get(1).messages[-1].generated_tokens == 2  # its max_tokens
    flagged = run_cli("-c", *flags, "--max-tokens", "5", env=env, input=b"four")
    assert flagged.returncode == 0, flagged.stderr.decode()
    assert store.get(1).messages[-1].generated_tokens == 5  # the flag wins
    new = run_cli(*flags, "--temperature", "0", "--max-tokens", "3", env=env, input=b"hi")
    assert new.returncode == 0
    latest = store.latest()
    assert latest is not None and latest.id == 2
    assert store.get(2).settings.chosen() == {}  # a new conversation has none of its own
