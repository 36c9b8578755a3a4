"""`llamachat create` through the real command: a Chatfile and flags, what the created model
answers with, lineage in show and list, bad input, and a create killed half-way."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamachat.engine import ChatModel, SamplingParams
from tests.conftest import cli_env, run_cli

QUESTION = "Hello, world! How are you today?"
SYSTEM = "You are a helpful assistant.\nAnswer in one line."


@pytest.fixture(scope="module")
def home(tiny_model_factory, tmp_path_factory):
    """A home with the tiny GQA model installed as `tiny`, and a LoRA of it made with peft."""
    from tests.create.test_lora_merge import make_adapter

    root = tmp_path_factory.mktemp("create-cli")
    env = cli_env(root)
    folder = tiny_model_factory()[0]
    assert run_cli("pull", str(folder), "--as", "tiny", env=env).returncode == 0
    make_adapter(folder, root / "adapters" / "lora", seed=11)
    return env, folder, root


def engine_answer(folder: Path, system: str | None, sampling: SamplingParams, tokens: int) -> bytes:
    model = ChatModel.load(folder, device="cpu")
    messages = [{"role": "user", "content": QUESTION}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    reply = model.session().reply(messages, sampling, max_new_tokens=tokens)
    return ("".join(reply) + "\n").encode("utf-8")


def listed(env) -> dict[str, dict]:
    return {entry["name"]: entry for entry in json.loads(run_cli("list", "--json", env=env).stdout)}


def test_a_chatfiles_system_prompt_and_parameters_are_the_created_models_defaults(home):
    env, folder, root = home
    chatfile = root / "Terse.chatfile"
    chatfile.write_text(
        "# a persona of tiny\n"
        "FROM tiny\n"
        'SYSTEM """\nYou are a helpful assistant.\nAnswer in one line.\n"""\n'
        "PARAMETER temperature 0\n"
        "parameter max_tokens 6\n"
        "PARAMETER repeat_penalty 1.0\n"
    )
    made = run_cli("create", "terse", "-f", str(chatfile), env=env)
    assert made.returncode == 0, made.stderr.decode()
    assert made.stdout == b""
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    answer = run_cli("ask", QUESTION, "-m", "terse", env=env)
    assert answer.returncode == 0, answer.stderr.decode()
    assert answer.stdout == engine_answer(folder, SYSTEM, greedy, 6)
    assert answer.stdout != engine_answer(folder, None, greedy, 6)  # the system prompt counts
    # Piped, as `echo question | llamachat -m terse` is used; flags still win.
    piped = run_cli("-m", "terse", "--max-tokens", "3", env=env, input=QUESTION.encode())
    assert piped.stdout == engine_answer(folder, SYSTEM, greedy, 3)
    own = run_cli("ask", QUESTION, "-m", "terse", "--system", "Be brief.", env=env)
    assert own.stdout == engine_answer(folder, "Be brief.", greedy, 6)


def test_flags_override_the_chatfile_and_show_and_list_tell_the_lineage(home):
    env, folder, root = home
    (root / "adapters" / "Chatfile").write_text(
        "FROM tiny\nADAPTER ./lora\nSYSTEM Say yes.\nPARAMETER temperature 0.7\n"
    )
    made = run_cli(
        "create",
        "tuned",
        "-f",
        str(root / "adapters" / "Chatfile"),  # ADAPTER ./lora: beside the Chatfile
        "--param",
        "temperature=0",
        "--param",
        "max_tokens=5",
        "--system",
        "Say no.",
        env=env,
    )
    assert made.returncode == 0, made.stderr.decode()
    shown = json.loads(run_cli("show", "tuned", "--json", env=env).stdout)
    lineage = shown["lineage"]
    assert lineage["base"] == "tiny" and lineage["merged"] is True
    (adapter,) = lineage["adapters"]
    assert adapter["path"] == str((root / "adapters" / "lora").resolve())
    assert (adapter["rank"], adapter["alpha"], adapter["scaling"]) == (4, 8.0, 2.0)
    assert shown["defaults"] == {
        "system": "Say no.",
        "temperature": 0,
        "max_tokens": 5,
    }
    human = run_cli("show", "tuned", env=env).stdout.decode()
    assert "made from" in human and "tiny" in human and "rank 4" in human
    entries = listed(env)
    assert entries["tuned"]["base"] == "tiny" and entries["tiny"]["base"] is None
    assert "tiny + 1 adapter" in run_cli("list", env=env).stdout.decode()
    # The adapter is in the weights: greedy answers are not the base's.
    greedy = SamplingParams(temperature=0)
    answer = run_cli("ask", QUESTION, "-m", "tuned", env=env)
    assert answer.returncode == 0 and answer.stdout
    assert answer.stdout != engine_answer(folder, "Say no.", greedy, 5)


@pytest.mark.parametrize(
    ("args", "chatfile", "code", "message"),
    [
        (["--from", "missing"], None, 1, "no model named 'missing'"),
        ([], "FROM tiny\nTEMPLATE {{ .Prompt }}\n", 2, "line 2: TEMPLATE is not supported"),
        ([], "FROM tiny\nPARAMETER top_p 2\n", 2, "top_p must be above 0, at most 1"),
        ([], "FROM tiny\nPARAMETER mirostat 1\n", 2, "unknown parameter 'mirostat'"),
        (["--from", "tiny", "--param", "temperature"], None, 2, "write NAME=VALUE"),
        (["--from", "tiny", "--chat-format", "gpt"], None, 2, "unknown chat format 'gpt'"),
        ([], "SYSTEM hi\n", 2, "needs a base model"),
        (["--from", "tiny", "--adapter", "/nowhere"], None, 1, "adapter /nowhere: no such folder"),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code_and_nothing_is_created(
    home, tmp_path, args, chatfile, code, message
):
    env, _, _ = home
    if chatfile is not None:
        (tmp_path / "Chatfile").write_text(chatfile)
        args = [*args, "-f", str(tmp_path / "Chatfile")]
    result = run_cli("create", "broken", *args, env=env)
    error = result.stderr.decode()
    assert result.returncode == code, error
    assert message in error and error.count("\n") == 1 and "Traceback" not in error
    assert result.stdout == b"" and "broken" not in listed(env)


def test_a_create_killed_half_way_leaves_nothing_and_the_next_one_succeeds(
    tiny_model_factory, tmp_path
):
    """A base big enough (some 100 MB) that merging takes a while; each try is killed at a random
    moment once its staging folder exists."""
    from tests.create.test_lora_merge import make_adapter

    env = cli_env(tmp_path)
    big = tiny_model_factory(hidden_size=512, intermediate_size=1408, num_hidden_layers=8)[0]
    assert run_cli("pull", str(big), "--as", "big", env=env).returncode == 0
    make_adapter(big, tmp_path / "lora", seed=12)
    staging = Path(env["LLAMACHAT_HOME"]) / "models" / ".staging"
    generator = random.Random(3)
    command = [sys.executable, "-m", "llamachat", "create", "big-tuned", "--from", "big"]
    command += ["--adapter", str(tmp_path / "lora")]
    killed_staged = 0
    for _ in range(3):
        process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.is_dir() for p in staging.glob("big-tuned.*")):
                break
            time.sleep(0.005)
        time.sleep(generator.uniform(0, 0.3))
        if process.poll() is None:
            killed_staged += 1
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if process.returncode == 0:  # finished before the kill: start again from nothing
            assert run_cli("rm", "big-tuned", "--yes", env=env).returncode == 0
        assert "big-tuned" not in listed(env)
    assert killed_staged >= 1  # at least one try was killed while it was writing
    made = run_cli(
        "create", "big-tuned", "--from", "big", "--adapter", str(tmp_path / "lora"), env=env
    )
    assert made.returncode == 0, made.stderr.decode()
    assert "big-tuned" in listed(env)
    assert not [p for p in staging.glob("big-tuned.*") if p.is_dir()]
    assert run_cli("verify", "big-tuned", env=env).returncode == 0


def test_a_model_created_without_merging_answers_as_the_merged_one_and_keeps_its_base(home):
    env, _, root = home
    lora = str(root / "adapters" / "lora")
    common = ["--from", "tiny", "--adapter", lora, "--param", "temperature=0"]
    assert run_cli("create", "merged", *common, env=env).returncode == 0
    lazy = run_cli("create", "lazy", *common, "--no-merge", env=env)
    assert lazy.returncode == 0, lazy.stderr.decode()
    assert b"applied on loading" in lazy.stderr
    answers = [
        run_cli("ask", QUESTION, "-m", name, "--max-tokens", "8", env=env)
        for name in ("merged", "lazy")
    ]
    assert answers[0].returncode == answers[1].returncode == 0
    assert answers[0].stdout == answers[1].stdout != b""
    entries = listed(env)
    assert entries["lazy"]["size"] < entries["merged"]["size"] / 2  # no weights of its own
    shown = json.loads(run_cli("show", "lazy", "--json", env=env).stdout)
    assert shown["lineage"]["merged"] is False and "applied on loading" in shown["weights"]
    refused = run_cli("rm", "tiny", "--yes", env=env)
    assert refused.returncode == 1
    assert refused.stderr.decode() == (
        "llamachat: error: lazy loads its weights from tiny: remove it first, or pass --force"
        " (then it cannot load)\n"
    )
    assert "tiny" in listed(env)
    assert run_cli("rm", "lazy", "--yes", env=env).returncode == 0
