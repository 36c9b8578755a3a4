"""benchmarks/serve_bench.py against a real `llamachat serve` of a tiny model: what it reports
per level agrees with what the server counted itself (/metrics), streamed and not; and a
server that is not there gives errors and exit 1, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli
from tests.server.conftest import start_server

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"
CHAT_200 = 'llamachat_requests_total{route="/v1/chat/completions",status="200"}'


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    env = cli_env(tmp_path_factory.mktemp("serve-bench"))
    result = run_cli("pull", str(tiny_model_factory()[0]), "--as", "tiny", env=env)
    assert result.returncode == 0, result.stderr.decode()
    served = start_server(env, "-m", "tiny", "--ctx", "512", "--max-batch", "4")
    yield served
    assert served.stop() == 0


def bench(url: str, *args: str, jsonl: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(BENCH), "--url", url, "--model", "tiny", "--timeout", "60"]
    command += [*args, *(["--jsonl", str(jsonl)] if jsonl else [])]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def counted(server) -> tuple[float, float, float]:
    return (
        server.metric(CHAT_200),
        server.metric("llamachat_prompt_tokens_total"),
        server.metric("llamachat_generated_tokens_total"),
    )


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_each_level_reports_what_the_server_counted(server, tmp_path, stream):
    jsonl = tmp_path / "bench.jsonl"
    before = counted(server)
    result = bench(
        f"{server.url}/v1",
        "--clients", "1", "3", "--requests", "2", "--warmup", "0",
        "--prompt-words", "12", "--max-tokens", "6",
        *([] if stream else ["--no-stream"]),
        jsonl=jsonl,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after = counted(server)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["clients"], r["requests"], r["errors"]) for r in rows] == [(1, 2, 0), (3, 6, 0)]
    requests = sum(r["requests"] for r in rows)
    prompt = sum(r["prompt_tokens_mean"] * r["requests"] for r in rows)
    generated = sum(r["completion_tokens"] for r in rows)
    assert after[0] - before[0] == requests
    assert after[1] - before[1] == pytest.approx(prompt)
    assert after[2] - before[2] == generated
    for row in rows:
        assert 0 < row["completion_tokens_mean"] <= 6
        assert row["generated_tok_per_s"] == pytest.approx(
            row["completion_tokens"] / row["wall_s"], rel=0.01
        )
        if stream:
            assert 0 < row["ttft_p50_ms"] <= 1000 * row["latency_p99_s"]
        else:
            assert row["ttft_p50_ms"] is None and row["itl_p50_ms"] is None
    table = result.stdout.splitlines()
    assert table[0].startswith("| clients | requests | errors | generated tok/s |")
    assert [line.split("|")[1:4] for line in table[2:]] == [
        [" 1 ", " 2 ", " 0 "],
        [" 3 ", " 6 ", " 0 "],
    ]


def test_a_server_that_is_not_there_gives_errors_and_exit_1():
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = bench(f"http://127.0.0.1:{port}/v1", "--clients", "2", "--requests", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "serve_bench: error at 2 clients: ConnectError" in result.stderr
    assert result.stdout.splitlines()[2].split("|")[1:4] == [" 2 ", " 2 ", " 2 "]
