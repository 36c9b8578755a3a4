"""`--quantize` through the real command: the flag, the config's `quantize`, the format that
`pull --quantize` records, and auto, in that order; bad formats end in one line on stderr."""

from __future__ import annotations

import json
import re

import pytest

from llamachat.engine import ChatModel
from llamachat.engine.kernels.cpu import native
from llamachat.engine.quantize import fbgemm_available
from tests.conftest import CLI_GREEDY, run_cli, sha256_of

QUESTION = "Hello, how are you today?"


def pull(env, folder, *args: str) -> str:
    result = run_cli("pull", str(folder), "--as", "tiny", *args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result.stderr.decode()


def ask(env, *args: str):
    result = run_cli(
        "ask", QUESTION, "--device", "cpu", "--temperature", "0", "--max-tokens", "12", "-v",
        *args, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return result


def weight_format(result) -> str:
    """The format the model was loaded in, from the -v lines on stderr."""
    (value,) = re.findall(r"^weight format:\s+(\S+)$", result.stderr.decode(), re.MULTILINE)
    return value


def engine_answer(folder, quantization: str) -> bytes:
    model = ChatModel.load(folder, device="cpu", quantization=quantization)
    reply = model.session().reply([{"role": "user", "content": QUESTION}], CLI_GREEDY, 12)
    return ("".join(reply) + "\n").encode("utf-8")


def shown(env) -> dict:
    result = run_cli("show", "tiny", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_ask_with_int8_answers_as_the_engine_does_with_int8_weights(env, folder):
    pull(env, folder)
    result = ask(env, "--quantize", "int8")
    assert weight_format(result) == "int8"
    assert result.stdout == engine_answer(folder, "int8")


def test_without_any_choice_the_model_loads_as_auto_picks(env, folder):
    pull(env, folder)
    assert shown(env)["quantization"] == "auto"
    assert weight_format(ask(env)) == ("f16" if fbgemm_available() else "none")


@pytest.mark.smollm2
def test_a_model_pulled_from_a_4_bit_gguf_loads_as_int4_by_default(smollm2_env):
    """SmolLM2's weights came from a Q4_1 GGUF: int4 gives back their own values, and where
    the C kernels run (CI's CPU) it is the fastest format, so auto picks it; a flag still wins."""
    result = run_cli("show", "smollm2", "--json", env=smollm2_env)
    assert json.loads(result.stdout)["quantization"] == "auto"
    expected = "int4" if native.enabled() else "f16"
    assert weight_format(ask(smollm2_env)) == expected
    assert weight_format(ask(smollm2_env, "--quantize", "f16")) == "f16"


def test_pull_records_the_format_and_a_later_ask_loads_with_it(env, folder):
    assert "it loads as int4 by default" in pull(env, folder, "--quantize", "int4")
    assert shown(env)["quantization"] == "int4"
    (listed,) = json.loads(run_cli("list", "--json", env=env).stdout)
    assert listed["quantization"] == "int4"
    human = run_cli("show", "tiny", env=env).stdout.decode()
    assert re.search(r"^weight format\s+int4\s*$", human, re.MULTILINE)
    result = ask(env)
    assert weight_format(result) == "int4"
    assert result.stdout == engine_answer(folder, "int4")


def test_pull_keeps_the_weights_as_they_were_downloaded(env, folder):
    pull(env, folder, "--quantize", "int4")
    details = shown(env)
    assert details["weights"] == "float32"
    for record in details["files"]:
        assert record["sha256"] == sha256_of(folder / record["path"])


def test_the_config_beats_the_pulled_format_and_the_flag_beats_the_config(env, folder):
    pull(env, folder, "--quantize", "int4")
    assert run_cli("config", "set", "quantize", "int8", env=env).returncode == 0
    assert "quantize = 'int8'" in run_cli("config", env=env).stdout.decode()
    assert weight_format(ask(env)) == "int8"
    assert weight_format(ask(env, "--quantize", "none")) == "none"
    assert run_cli("config", "unset", "quantize", env=env).returncode == 0
    assert weight_format(ask(env)) == "int4"


def test_the_config_refuses_an_unknown_format(env):
    result = run_cli("config", "set", "quantize", "int3", env=env)
    assert result.returncode == 2  # bad input
    (line,) = result.stderr.decode().strip().splitlines()
    assert "quantize takes one of auto, none, int8, int4, fp8, f16, not 'int3'" in line


@pytest.mark.parametrize(
    "args",
    [
        ["ask", "Hi", "--quantize", "int3"],
        ["--quantize", "int3"],
        ["bench", "-m", "tiny", "--quantize", "int3"],
        ["pull", "FOLDER", "--quantize", "int3"],
    ],
)
def test_an_unknown_format_is_a_usage_error_in_one_line(env, folder, args):
    pull(env, folder)
    args = [str(folder) if arg == "FOLDER" else arg for arg in args]
    result = run_cli(*args, env=env, input=b"Hi")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.decode().strip().splitlines()
    assert "'int3' is not one of auto, none, int8, int4, fp8, f16" in line
    assert result.stdout == b""


def test_a_format_the_engine_refuses_is_one_clear_line(env, folder):
    pull(env, folder)
    result = run_cli(
        "ask", "Hi", "--device", "cpu", "--quantize", "f16", "--dtype", "bf16", env=env
    )
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert line == "llamachat: error: f16 weights compute in float32: use --dtype float32 with them"


def test_a_pulled_format_the_device_cannot_run_is_overridden_by_the_flag(env, folder):
    pull(env, folder, "--quantize", "f16")
    refused = run_cli("ask", "Hi", "--device", "cpu", "--dtype", "bf16", env=env)
    assert refused.returncode == 1
    assert b"f16 weights compute in float32" in refused.stderr
    assert weight_format(ask(env, "--dtype", "bf16", "--quantize", "int8")) == "int8"


def test_bench_loads_with_the_format_and_reports_it(env, folder):
    pull(env, folder)
    result = run_cli(
        "bench", "-m", "tiny", "--device", "cpu", "--quantize", "int8", "--json", env=env,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["quantization"] == "int8"
    # int8 weights: a byte per weight of the projections, so far fewer bytes than float32.
    parameters = shown(env)["parameters"]
    assert data["weight_bytes"] < 0.6 * 4 * parameters


def test_the_chat_app_is_given_the_flag_over_the_config(env, monkeypatch):
    from llamachat.cli.generation import app_options
    from llamachat.cli.options import GenerationOptions

    monkeypatch.setenv("LLAMACHAT_HOME", env["LLAMACHAT_HOME"])
    assert app_options(GenerationOptions(), None).quantize is None  # the model's, else auto
    assert run_cli("config", "set", "quantize", "int8", env=env).returncode == 0
    assert app_options(GenerationOptions(), None).quantize == "int8"
    assert app_options(GenerationOptions(quantize="int4"), None).quantize == "int4"


@pytest.mark.skipif(not native.cpu_supported(), reason="the C kernels need AVX2, FMA and F16C")
def test_int4_without_a_working_compiler_answers_after_one_warning_line(env, folder, tmp_path):
    pull(env, folder)
    env = {**env, "CC": "false", native.CACHE_DIR_VARIABLE: str(tmp_path / "native")}
    result = ask(env, "--quantize", "int4")
    assert weight_format(result) == "int4"
    warning = "llamachat: int4 on the CPU runs on PyTorch's slower kernels: "
    lines = [line for line in result.stderr.decode().splitlines() if "llamachat: " in line]
    assert lines == [warning + "false could not build its C kernels: no message"]
    assert "RuntimeWarning" not in result.stderr.decode()
    assert result.stdout.strip()


def test_fp8_on_a_cpu_is_one_clear_line(env, folder):
    pull(env, folder)
    result = run_cli("ask", "Hi", "--device", "cpu", "--quantize", "fp8", env=env)
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert line == (
        "llamachat: error: fp8 weights need an NVIDIA GPU with FP8 tensor cores: on a CPU use int4"
    )
