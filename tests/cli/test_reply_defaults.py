"""What a reply uses when no flag and no config says: the model's generation_config.json, else
llamachat's defaults (repetition penalty 1.1, at most 2,048 tokens), through the real command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llamachat.engine import ChatModel, SamplingParams
from tests.conftest import cli_env, rerecord, run_cli

QUESTION = "Hello, world! How are you today?"


@pytest.fixture(scope="module")
def installed(tiny_model_factory, tmp_path_factory):
    """A home with `plain` (no sampling advice), `advised` (generation_config.json says greedy,
    penalty 1.3, 7 tokens) and `long` (a 4,096-token context), all the same weights but long's."""
    env = cli_env(tmp_path_factory.mktemp("defaults"))
    folder = tiny_model_factory()[0]
    long_folder = tiny_model_factory(max_position_embeddings=4096)[0]
    for source, name in ((folder, "plain"), (folder, "advised"), (long_folder, "long")):
        assert run_cli("pull", str(source), "--as", name, env=env).returncode == 0
    advised = Path(env["LLAMACHAT_HOME"]) / "models" / "advised"
    config_file = advised / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(temperature=0.0, repetition_penalty=1.3, max_new_tokens=7, top_k=5)
    config_file.write_text(json.dumps(config))
    rerecord(advised)
    return env, folder


def engine_answer(folder, sampling: SamplingParams, max_new_tokens: int) -> bytes:
    model = ChatModel.load(folder, device="cpu", quantization="auto")
    messages = [{"role": "user", "content": QUESTION}]
    reply = model.session().reply(messages, sampling, max_new_tokens=max_new_tokens)
    return ("".join(reply) + "\n").encode("utf-8")


def test_greedy_answers_use_a_repetition_penalty_of_1_1_by_default(installed):
    env, folder = installed
    greedy = ["ask", QUESTION, "-m", "plain", "--temperature", "0", "--max-tokens", "24"]
    result = run_cli(*greedy, env=env, input=b"")
    penalised = engine_answer(folder, SamplingParams(temperature=0, repeat_penalty=1.1), 24)
    plain = engine_answer(folder, SamplingParams(temperature=0, repeat_penalty=1.0), 24)
    assert penalised != plain  # the test can tell the two apart
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == penalised
    off = run_cli(*greedy, "--repeat-penalty", "1", env=env, input=b"")
    assert off.stdout == plain


def test_the_models_generation_config_is_the_default_and_flags_override_it(installed):
    env, folder = installed
    advised = engine_answer(folder, SamplingParams(temperature=0, repeat_penalty=1.3, top_k=5), 7)
    result = run_cli("ask", QUESTION, "-m", "advised", "--verbose", env=env, input=b"")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == advised
    assert re.search(r"generated tokens:\s+7\n", result.stderr.decode())
    overridden = run_cli(
        "ask",
        QUESTION,
        "-m",
        "advised",
        "--repeat-penalty",
        "1",
        "--max-tokens",
        "9",
        env=env,
        input=b"",
    )
    plain = engine_answer(folder, SamplingParams(temperature=0, repeat_penalty=1.0, top_k=5), 9)
    assert overridden.stdout == plain


def test_an_answer_stops_at_2048_tokens_by_default_and_says_so(installed):
    env, _ = installed
    result = run_cli(
        "ask", QUESTION, "-m", "long", "--temperature", "0", "--verbose", env=env, input=b""
    )
    assert result.returncode == 0, result.stderr.decode()
    stderr = result.stderr.decode()
    assert re.search(r"generated tokens:\s+2048\n", stderr), stderr
    assert re.search(r"finish:\s+length\n", stderr)
    assert "cut off at its limit of 2048 tokens (raise --max-tokens)" in stderr


def test_a_limit_given_on_the_command_line_is_not_reported_as_a_cut(installed):
    env, _ = installed
    result = run_cli(
        "ask", QUESTION, "-m", "long", "--temperature", "0", "--max-tokens", "5", env=env, input=b""
    )
    assert result.returncode == 0 and result.stderr == b""
