"""`--gpus N`: the model split over N processes (on this CPU over gloo, as over NCCL on GPUs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import CLI_GREEDY, cli_env, run_cli, start_cli

pytestmark = pytest.mark.smollm2

QUESTION = "What is the capital of France?"
PLACED = ("--device", "cpu", "--dtype", "float32", "--quantize", "none")


def test_a_piped_answer_over_three_processes_is_the_one_process_answer(smollm2_env, smollm2):
    result = run_cli(
        *PLACED, "--gpus", "3", "--temperature", "0", "--max-tokens", "24",
        env=smollm2_env, input=QUESTION.encode(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    messages = [{"role": "user", "content": QUESTION}]
    reply = smollm2.session().reply(messages, CLI_GREEDY, max_new_tokens=24)
    assert result.stdout == ("".join(reply) + "\n").encode()
    assert result.stderr == b""  # the other ranks write nothing either


def test_a_split_that_does_not_divide_the_heads_is_one_line(smollm2_env):
    result = run_cli(*PLACED, "--gpus", "2", env=smollm2_env, input=QUESTION.encode())
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "9 attention heads do not split over 2 GPUs" in lines[0], lines


def test_bench_splits_random_weights_and_times_the_all_reduces(tmp_path):
    """`bench --shape S --gpus N`: each rank makes its own part; the all-reduces a token cost
    are reported beside the speeds (what the multi-GPU benchmark reads)."""
    env = cli_env(tmp_path)
    result = run_cli("bench", "--shape", "toy", "--device", "cpu", "--gpus", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["gpus"] == 2 and data["all_reduce_ms_per_token"] > 0
    assert all(rate > 0 for rate in data["decode_tokens_per_s"].values())
    # Rank 0's kv heads: 2 kv heads over 2 ranks, 16 each, 2 layers, K and V, float32.
    assert data["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 4


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_other_ranks_exit_when_the_command_is_killed(smollm2_env):
    """A command killed outright (SIGKILL: no atexit) leaves no rank behind."""
    process = start_cli(
        *PLACED, "--gpus", "3", "--max-tokens", "2000", "--temperature", "1",
        env=smollm2_env, input=b"Write a very long story about the sea.",
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.read(1)  # answering: every rank is up
        followers = _children(process.pid)
        assert len(followers) == 2
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in followers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in followers)


def test_serve_answers_from_a_split_model_as_the_engine_does(smollm2_env, smollm2):
    from tests.server.conftest import start_server

    served = start_server(smollm2_env, "-m", "smollm2", *PLACED, "--gpus", "3", "--ctx", "1024")
    try:
        completion = served.client().chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=24,
            extra_body={"repeat_penalty": CLI_GREEDY.repeat_penalty},
        )
    finally:
        assert served.stop() == 0
    messages = [{"role": "user", "content": QUESTION}]
    expected = "".join(smollm2.session().reply(messages, CLI_GREEDY, max_new_tokens=24))
    assert completion.choices[0].message.content == expected


def test_serve_refuses_a_batch_from_a_split_model_in_one_line(smollm2_env):
    result = run_cli("serve", "-m", "smollm2", "--gpus", "3", "--max-batch", "4", env=smollm2_env)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "one reply at a time" in lines[0], lines
