"""A `llamachat serve` subprocess on 127.0.0.1, serving a model from a test home, and the real
OpenAI client pointed at it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.conftest import cli_env, run_cli

STARTUP_S = 120
REQUEST_S = 120  # every request in these tests ends within this, or fails


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    log: list[str] = field(default_factory=list)

    def client(self, **options):
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.api_key or "none",
            timeout=REQUEST_S,
            max_retries=0,
            **options,
        )

    def metric(self, name: str) -> float:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=REQUEST_S).text
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
        return sum(values)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=60)


def start_server(env: dict[str, str], *args: str, api_key: str | None = None) -> Server:
    command = [sys.executable, "-m", "llamachat", "serve", "--port", "0", *args]
    if api_key:
        command += ["--api-key", api_key]
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl+C's default, as at a terminal (a test runner may ignore SIGINT for children).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:  # keeps draining stderr, so the server never blocks on a full pipe
        for line in process.stderr:
            log.append(line)
            if match := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + STARTUP_S
    while not found.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not start: {''.join(log)}")
    return Server(process, url[0], api_key, log)


@pytest.fixture(scope="package")
def tiny_home(tiny_model_factory, tmp_path_factory) -> dict[str, str]:
    env = cli_env(tmp_path_factory.mktemp("serve"))
    folder = tiny_model_factory()[0]
    result = run_cli("pull", str(folder), "--as", "tiny", env=env)
    assert result.returncode == 0, result.stderr.decode()
    return env


def check_completion_logprobs(choice, top: int) -> None:
    """A completion's `logprobs` in the legacy shape: the tokens are the text in pieces, each at
    its offset, with a log probability and at most `top` alternatives."""
    logprobs = choice.logprobs
    tokens, offsets = logprobs.tokens, logprobs.text_offset
    assert tokens and "".join(tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(offsets)
    assert len(offsets) == len(tokens)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for token, offset in zip(tokens, offsets, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    for chosen, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen <= 0
        assert 1 <= len(alternatives) <= top and all(v <= 0 for v in alternatives.values())
