"""`llamachat pull hf:ORG/REPO` against a local Hub (tests/hub_server.py), through the real CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli, sha256_of
from tests.hub_server import FakeHub, Fault

REPO = "test/tiny-llama"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from tests.tiny import make_model

    folder = tmp_path_factory.mktemp("hub-source")
    make_model(folder, hidden_size=256, intermediate_size=704, num_hidden_layers=4)
    return folder


@pytest.fixture
def hub(model_folder):
    server = FakeHub().start()
    server.add_folder(REPO, model_folder)
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path, hub):
    return cli_env(tmp_path, HF_ENDPOINT=hub.url)


def installed(env) -> list[dict]:
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def weights_size(hub: FakeHub) -> int:
    return len(hub.repos[REPO].files["model.safetensors"].data)


def test_pull_installs_every_file_with_its_checksum(hub, env, model_folder):
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    (model,) = installed(env)
    assert model["name"] == "tiny-llama" and model["source"] == f"hf:{REPO}"
    assert model["revision"] == hub.repos[REPO].commit
    manifest = json.loads((Path(model["path"]) / "manifest.json").read_text())
    served = {name: f.sha256 for name, f in hub.repos[REPO].files.items()}
    assert {record["path"]: record["sha256"] for record in manifest["files"]} == served
    for record in manifest["files"]:
        assert sha256_of(Path(model["path"]) / record["path"]) == record["sha256"]


def test_installed_model_loads_and_equals_the_source(hub, env, model_folder):
    import torch

    from llamachat.engine import ChatModel

    assert run_cli("pull", f"hf:{REPO}", "--as", "mine", env=env).returncode == 0
    pulled = ChatModel.load(Path(env["LLAMACHAT_HOME"]) / "models" / "mine", device="cpu")
    source = ChatModel.load(model_folder, device="cpu")
    for (name, a), (_, b) in zip(
        pulled.transformer.state_dict().items(),
        source.transformer.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_a_model_in_the_hugging_face_cache_is_not_downloaded_again(hub, env):
    assert run_cli("pull", f"hf:{REPO}", env=env).returncode == 0
    assert run_cli("rm", "tiny-llama", "--yes", env=env).returncode == 0
    hub.requests.clear()
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert not [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    assert [m["name"] for m in installed(env)] == ["tiny-llama"]


def test_pulling_an_installed_model_again_changes_nothing(hub, env):
    assert run_cli("pull", f"hf:{REPO}", env=env).returncode == 0
    hub.requests.clear()
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 0
    assert b"already installed" in result.stderr
    assert not [r for r in hub.requests if "/resolve/" in r.path]


def test_a_download_cut_off_midway_is_resumed_by_the_next_pull(hub, env):
    size = weights_size(hub)
    hub.faults[(REPO, "model.safetensors")] = Fault(cut_after=size // 2, then_refuse=20)
    first = run_cli("pull", f"hf:{REPO}", env=env)
    assert first.returncode == 1
    stderr = first.stderr.decode()
    assert "run the pull again to resume" in stderr and "Traceback" not in stderr
    assert installed(env) == []
    hub.faults.clear()
    hub.requests.clear()
    second = run_cli("pull", f"hf:{REPO}", env=env)
    assert second.returncode == 0, second.stderr.decode()
    (resumed,) = hub.downloads("model.safetensors")
    assert resumed.range == f"bytes={size // 2}-"
    assert resumed.sent == size - size // 2
    assert installed(env)[0]["name"] == "tiny-llama"


def test_a_dropped_connection_is_retried_within_the_pull(hub, env):
    size = weights_size(hub)
    hub.faults[(REPO, "model.safetensors")] = Fault(cut_after=size // 3)
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 0, result.stderr.decode()
    first, retry = hub.downloads("model.safetensors")
    assert first.sent == size // 3 and retry.range == f"bytes={size // 3}-"


def test_a_corrupted_file_is_caught_by_its_checksum(hub, env):
    hub.faults[(REPO, "model.safetensors")] = Fault(corrupt=True)
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 1
    assert b"corrupt" in result.stderr and b"run the pull again" in result.stderr
    assert installed(env) == []
    blobs = list((Path(env["HF_HOME"]) / "hub").rglob("blobs/*"))
    assert hub.repos[REPO].files["model.safetensors"].sha256 not in {b.name for b in blobs}
    hub.faults.clear()
    assert run_cli("pull", f"hf:{REPO}", env=env).returncode == 0


def test_a_gated_repo_says_what_to_do(hub, env, model_folder):
    hub.add_folder("meta/gated", model_folder, gated=True)
    result = run_cli("pull", "hf:meta/gated", env=env)
    assert result.returncode == 1
    assert result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert "gated" in line and "HF_TOKEN" in line and f"{hub.url}/meta/gated" in line


def test_a_missing_repo_or_revision_is_named(hub, env):
    missing = run_cli("pull", "hf:test/no-such-model", env=env)
    assert missing.returncode == 1 and b"no model repository test/no-such-model" in missing.stderr
    revision = run_cli("pull", f"hf:{REPO}@v9", env=env)
    assert revision.returncode == 1 and b"no revision 'v9'" in revision.stderr


def test_an_unreachable_hub_fails_fast_with_a_clear_message(tmp_path):
    import socket

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = cli_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed}")
    result = run_cli("pull", f"hf:{REPO}", env=env, timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert "cannot reach the Hugging Face Hub" in line


def test_an_unsupported_architecture_is_refused_before_the_weights_download(
    hub, env, tmp_path, model_folder
):
    other = tmp_path / "gpt2"
    other.mkdir()
    for path in model_folder.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    hub.add_folder("test/gpt2", other)
    result = run_cli("pull", "hf:test/gpt2", env=env)
    assert result.returncode == 1 and b"GPT2LMHeadModel" in result.stderr
    assert hub.downloads("model.safetensors") == []


def test_a_repo_with_only_pickle_weights_is_refused(hub, env, tmp_path, model_folder):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    hub.add_folder("test/pickled", pickled)
    result = run_cli("pull", "hf:test/pickled", env=env)
    assert result.returncode == 1 and b"safetensors only" in result.stderr


def test_killing_pulls_at_random_points_never_leaves_a_broken_model(hub, env):
    """kill -9 during a slow download, again and again: `list` never shows a partial model, each
    pull picks up the bytes already there, and a last pull completes."""
    size = weights_size(hub)
    hub.faults[(REPO, "model.safetensors")] = Fault(bytes_per_second=size / 3)
    blobs = Path(env["HF_HOME"]) / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    chooser = random.Random(1234)
    for attempt in range(6):
        process = subprocess.Popen(
            [sys.executable, "-m", "llamachat", "pull", f"hf:{REPO}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if attempt % 3 == 0:  # anywhere: starting up, asking the Hub, or downloading
            time.sleep(chooser.uniform(0.0, 1.5))
        else:  # certainly mid-download: once the partial file has grown
            _wait_for_growth(blobs, process)
            time.sleep(chooser.uniform(0.0, 0.4))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        for model in installed(env):  # a model that is listed is whole
            manifest = json.loads((Path(model["path"]) / "manifest.json").read_text())
            for record in manifest["files"]:
                assert sha256_of(Path(model["path"]) / record["path"]) == record["sha256"]
        hub.faults[(REPO, "model.safetensors")] = Fault(bytes_per_second=size / 3)
    hub.faults.clear()
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert [m["name"] for m in installed(env)] == ["tiny-llama"]
    served = sum(r.sent for r in hub.downloads("model.safetensors"))
    ranged = [r for r in hub.downloads("model.safetensors") if r.range != "bytes=0-"]
    assert ranged, "no pull resumed a partial download"
    assert served < 2 * size, "the pulls started over instead of resuming"
    staging = Path(env["LLAMACHAT_HOME"]) / "models" / ".staging"
    assert not [p for p in staging.iterdir() if p.is_dir()]


def _wait_for_growth(blobs: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    def partial_size() -> int:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.exists() else 0

    start, deadline = partial_size(), time.monotonic() + timeout
    while partial_size() <= start and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_pulling_again_with_another_format_changes_only_the_record(hub, env):
    def recorded() -> str:
        return json.loads(run_cli("show", "tiny-llama", "--json", env=env).stdout)["quantization"]

    assert run_cli("pull", f"hf:{REPO}", "--quantize", "int4", env=env).returncode == 0
    assert recorded() == "int4"
    hub.requests.clear()
    again = run_cli("pull", f"hf:{REPO}", "--quantize", "int8", env=env)
    assert again.returncode == 0, again.stderr.decode()
    assert b"already installed and up to date; it loads as int8 by default" in again.stderr
    assert not [r for r in hub.requests if "/resolve/" in r.path]
    assert recorded() == "int8"
    assert run_cli("pull", f"hf:{REPO}", env=env).returncode == 0
    assert recorded() == "int8"  # a pull without --quantize keeps the choice
    assert run_cli("pull", f"hf:{REPO}", "--quantize", "auto", env=env).returncode == 0
    assert recorded() == "auto"


def test_a_truncated_install_is_repaired_by_pulling_again(hub, env):
    assert run_cli("pull", f"hf:{REPO}", env=env).returncode == 0
    weights = Path(installed(env)[0]["path"]) / "model.safetensors"
    with open(weights, "r+b") as file:  # also the cache's blob: the install is a hard link
        file.truncate(weights.stat().st_size // 2)
    assert installed(env)[0]["status"] == "damaged"
    again = run_cli("pull", f"hf:{REPO}", env=env)
    assert again.returncode == 0, again.stderr.decode()
    assert b"already installed" not in again.stderr
    assert installed(env)[0]["status"] == "ok"
    assert run_cli("verify", "tiny-llama", env=env).returncode == 0


def test_changed_bytes_found_by_verify_are_repaired_as_its_message_says(hub, env):
    assert run_cli("pull", f"hf:{REPO}", env=env).returncode == 0
    weights = Path(installed(env)[0]["path"]) / "model.safetensors"
    with open(weights, "r+b") as file:
        file.seek(weights.stat().st_size // 2)
        file.write(random.Random(3).randbytes(4096))
    verified = run_cli("verify", "tiny-llama", env=env)
    assert verified.returncode == 1
    commit = hub.repos[REPO].commit
    repair = f"llamachat rm tiny-llama --yes && llamachat pull hf:{REPO}@{commit} --as tiny-llama"
    assert f"`{repair}` reinstalls it" in verified.stderr.decode()
    for command in repair.split(" && "):
        result = run_cli(*command.split()[1:], env=env)
        assert result.returncode == 0, result.stderr.decode()
    assert run_cli("verify", "tiny-llama", env=env).returncode == 0
