"""`llamachat history`, and the one-shot path writing to the same history as the chat app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamachat.history.presets import BUILTIN_PRESETS
from llamachat.history.store import HistoryStore
from tests.conftest import CLI_GREEDY, cli_env, run_cli

STATUS = {"stop": "complete", "length": "length"}  # a reply's status, by the engine's reason


@pytest.fixture
def history(env) -> HistoryStore:
    store = HistoryStore(Path(env["LLAMACHAT_HOME"]) / "history.db")
    first = store.create(model="smollm2", system_prompt="Be brief.")
    store.add_message(first, "user", "Where is the Great Wall?")
    store.add_message(first, "assistant", "In northern China.")
    second = store.create(model="smollm2")
    store.add_message(second, "user", "写一首关于长城的诗")
    return store


def test_list_show_search_export_and_remove(env, history, tmp_path):
    listed = json.loads(run_cli("history", "list", "--json", env=env).stdout)
    assert [c["title"] for c in listed] == ["写一首关于长城的诗", "Where is the Great Wall?"]
    first = listed[1]["id"]
    shown = run_cli("history", "show", str(first), env=env).stdout.decode()
    assert shown.startswith("# Where is the Great Wall?") and "In northern China." in shown
    hits = json.loads(run_cli("history", "search", "长城", "--json", env=env).stdout)
    assert [hit["conversation_id"] for hit in hits] == [listed[0]["id"]]
    out = tmp_path / "export.json"
    assert (
        run_cli("history", "export", str(first), "-f", "json", "-o", str(out), env=env).returncode
        == 0
    )
    assert [m["role"] for m in json.loads(out.read_text())["messages"]] == [
        "system",
        "user",
        "assistant",
    ]
    refused = run_cli("history", "rm", str(first), env=env)
    assert refused.returncode == 2 and b"--yes" in refused.stderr
    assert run_cli("history", "rm", str(first), "--yes", env=env).returncode == 0
    assert len(json.loads(run_cli("history", "list", "--json", env=env).stdout)) == 1


def test_unknown_conversation_and_bad_format(env, history):
    missing = run_cli("history", "show", "999", env=env)
    assert (
        missing.returncode == 1
        and b"no conversation 999" in missing.stderr
        and missing.stdout == b""
    )
    bad = run_cli("history", "export", "1", "-f", "pdf", env=env)
    assert bad.returncode == 2


def test_continue_with_no_history_is_a_usage_error(tmp_path):
    result = run_cli("-c", env=cli_env(tmp_path), input=b"Hello")
    assert result.returncode == 2 and b"no conversation to continue" in result.stderr


@pytest.mark.smollm2
def test_piped_exchanges_are_saved_and_continue_adds_the_next_turn(
    smollm2_env, smollm2_default, tmp_path
):
    env = {**smollm2_env, "LLAMACHAT_HOME": str(tmp_path)}
    (tmp_path / "models").symlink_to(Path(smollm2_env["LLAMACHAT_HOME"]) / "models")
    flags = ["--temperature", "0", "--max-tokens", "16"]
    first = run_cli(*flags, env=env, input=b"Name a color.")
    assert first.returncode == 0
    second = run_cli("-c", *flags, env=env, input=b"Name another one.")
    assert second.returncode == 0
    (conversation,) = json.loads(run_cli("history", "list", "--json", env=env).stdout)
    shown = json.loads(
        run_cli("history", "show", str(conversation["id"]), "--json", env=env).stdout
    )
    assert shown["messages"][1]["content"] + "\n" == first.stdout.decode()
    # The continued answer is the engine's answer to the whole conversation so far.
    messages = [{"role": m["role"], "content": m["content"]} for m in shown["messages"][:3]]
    reply = smollm2_default.session().reply(messages, CLI_GREEDY, max_new_tokens=16)
    assert second.stdout.decode() == "".join(reply) + "\n"
    # Each reply is kept with how the engine ended it.
    assert [(m["role"], m["status"]) for m in shown["messages"][::2]] == [("user", "complete")] * 2
    replies = [(m["status"], m["finish_reason"]) for m in shown["messages"][1::2]]
    assert all(status == STATUS[reason] for status, reason in replies)
    assert replies[1][1] == reply.stats.finish_reason


@pytest.mark.smollm2
def test_a_reply_cut_by_the_token_limit_shows_as_cut(smollm2_env, tmp_path):
    env = {**smollm2_env, "LLAMACHAT_HOME": str(tmp_path)}
    (tmp_path / "models").symlink_to(Path(smollm2_env["LLAMACHAT_HOME"]) / "models")
    answered = run_cli("--max-tokens", "3", env=env, input=b"Tell me a long story.")
    assert answered.returncode == 0, answered.stderr.decode()
    shown = json.loads(run_cli("history", "show", "1", "--json", env=env).stdout)
    reply = shown["messages"][-1]
    assert (reply["status"], reply["finish_reason"], reply["generated_tokens"]) == (
        "length",
        "length",
        3,
    )
    for command in ("show", "export"):
        text = run_cli("history", command, "1", env=env).stdout.decode()
        assert "\n## Assistant (smollm2) — cut: token limit\n" in text


@pytest.mark.smollm2
def test_preset_sets_the_system_prompt(smollm2_env, tmp_path):
    env = {**smollm2_env, "LLAMACHAT_HOME": str(tmp_path)}
    (tmp_path / "models").symlink_to(Path(smollm2_env["LLAMACHAT_HOME"]) / "models")
    result = run_cli("--preset", "concise", "--max-tokens", "8", env=env, input=b"Hi")
    assert result.returncode == 0
    (conversation,) = json.loads(run_cli("history", "list", "--json", env=env).stdout)
    shown = json.loads(
        run_cli("history", "show", str(conversation["id"]), "--json", env=env).stdout
    )
    assert shown["messages"][0] == {
        **shown["messages"][0],
        "role": "system",
        "content": BUILTIN_PRESETS["concise"],
    }
    unknown = run_cli("--preset", "nope", env=env, input=b"Hi")
    assert unknown.returncode == 2 and b"concise" in unknown.stderr


@pytest.mark.parametrize(
    "command",
    [["show"], ["show", "--json"], ["export"], ["export", "-f", "json"], ["rm", "--yes"]],
)
def test_an_id_too_large_for_the_database_is_no_such_conversation(env, history, command):
    too_large = str(2**70)  # SQLite keeps 64-bit integers
    result = run_cli("history", *command[:1], too_large, *command[1:], env=env)
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"llamachat: error: no conversation {too_large} (`llamachat history list` shows them)"
    ]


def test_a_search_term_that_is_not_utf8_is_refused_in_one_line(env, history):
    # As the shell passes $'\xff': Python sees a str holding a lone surrogate.
    result = subprocess.run(
        [sys.executable, "-m", "llamachat", "history", "search", b"\xff"],
        env=env,
        capture_output=True,
    )
    assert result.returncode == 2 and result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("llamachat: error: ") and "UTF-8" in line
