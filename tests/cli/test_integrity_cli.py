"""A damaged model: sizes are checked before every load and by list/show, `llamachat verify`
reads every byte against the manifest's sha256."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import run_cli, sha256_of


@pytest.fixture
def model(env, folder) -> Path:
    """`tiny`, freshly pulled, for a test to damage."""
    result = run_cli("pull", str(folder), "--as", "tiny", env=env)
    assert result.returncode == 0, result.stderr.decode()
    return Path(env["LLAMACHAT_HOME"]) / "models" / "tiny"


def only_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "Error:" not in lines[0], lines[0]
    return lines[0]


def listed(env) -> dict:
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    (entry,) = json.loads(result.stdout)
    return entry


def test_a_truncated_weights_file_is_refused_before_loading_and_marked(env, model):
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.truncate(size // 2)

    asked = run_cli("ask", "-m", "tiny", "Hi", env=env)
    assert asked.returncode == 1 and asked.stdout == b""
    line = only_line(asked.stderr)
    assert "tiny is damaged: model.safetensors is" in line and f"says {size:,}" in line
    assert "llamachat verify tiny" in line and "--as tiny" in line

    entry = listed(env)
    assert entry["status"] == "damaged" and "model.safetensors" in entry["problem"]
    table = run_cli("list", env=env)
    assert "damaged" in table.stdout.decode() and "llamachat verify tiny" in table.stderr.decode()

    shown = run_cli("show", "tiny", env=env)
    assert shown.returncode == 0, shown.stderr.decode()
    assert "damaged" in shown.stdout.decode() and f"{size // 2:,} bytes" in shown.stdout.decode()
    assert "llamachat verify tiny" in shown.stderr.decode()
    details = json.loads(run_cli("show", "tiny", "--json", env=env).stdout)
    assert details["status"] == "damaged"
    (bad,) = [f for f in details["files"] if f["problem"]]
    assert bad["path"] == "model.safetensors" and bad["size_on_disk"] == size // 2

    verified = run_cli("verify", "tiny", env=env)
    assert verified.returncode == 1
    assert "model.safetensors" in verified.stderr.decode().strip().splitlines()[-1]


def test_a_missing_file_is_named(env, model):
    (model / "tokenizer.json").unlink()
    asked = run_cli("ask", "-m", "tiny", "Hi", env=env)
    assert asked.returncode == 1
    assert "tokenizer.json is missing" in only_line(asked.stderr)


def test_random_bytes_inside_the_weights_are_caught_by_verify(env, model):
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.seek(size // 2)
        file.write(random.Random(7).randbytes(4096))
    assert listed(env)["status"] == "ok"  # the same size: only reading every byte tells

    verified = run_cli("verify", "tiny", env=env)
    assert verified.returncode == 1
    last = verified.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("llamachat: error: tiny is damaged: model.safetensors")
    assert "sha256" in last and "--as tiny" in last
    assert "model.safetensors" in verified.stdout.decode()

    report = run_cli("verify", "tiny", "--json", env=env)
    assert report.returncode == 1
    data = json.loads(report.stdout)
    assert data["name"] == "tiny" and data["ok"] is False
    bad = [f for f in data["files"] if f["status"] != "ok"]
    assert [f["path"] for f in bad] == ["model.safetensors"]
    assert bad[0]["sha256"] == sha256_of(weights) != bad[0]["expected_sha256"]


def test_verify_passes_an_intact_model(env, model):
    verified = run_cli("verify", "tiny", env=env)
    assert verified.returncode == 0, verified.stderr.decode()
    report = run_cli("verify", "tiny", "--json", env=env)
    assert report.returncode == 0
    data = json.loads(report.stdout)
    manifest = json.loads((model / "manifest.json").read_text())
    assert data["ok"] is True
    assert {f["path"]: f["sha256"] for f in data["files"]} == {
        r["path"]: r["sha256"] for r in manifest["files"]
    }
    assert all(f["status"] == "ok" for f in data["files"])


def test_verify_of_a_model_that_is_not_there_is_one_line(env, model):
    result = run_cli("verify", "tiyn", env=env)
    assert result.returncode == 1 and "did you mean tiny" in only_line(result.stderr)
    (model / "manifest.json").write_text("{")
    broken = run_cli("verify", "tiny", env=env)
    assert broken.returncode == 1 and "tiny is broken" in only_line(broken.stderr)
