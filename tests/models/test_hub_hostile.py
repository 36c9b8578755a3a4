"""A hostile Hub: every name a server sends (ETag, commit, tree paths, digests, sizes) is checked
before it becomes a path, and a pull that meets a bad one writes and deletes nothing outside the
cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli
from tests.hub_server import FakeHub

REPO = "test/tiny-llama"
VICTIM = b"a file of the user's, outside the cache\n"


@pytest.fixture
def hub(folder):
    server = FakeHub().start()
    server.add_folder(REPO, folder)
    yield server
    server.stop()


@pytest.fixture
def folder(tiny_model_factory) -> Path:
    return tiny_model_factory()[0]


@pytest.fixture
def env(tmp_path, hub):
    return cli_env(tmp_path, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the cache, with one file in it that a pull must never touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_bytes(VICTIM)
    return folder


def storage(env) -> Path:
    return Path(env["HF_HOME"]) / "hub" / ("models--" + REPO.replace("/", "--"))


def tree_outside_the_cache(root: Path, env) -> dict[str, str]:
    """Every file under `root` but the Hugging Face cache and llamachat's home, with a digest."""
    kept = (Path(env["HF_HOME"]), Path(env["LLAMACHAT_HOME"]))
    files = {}
    for path in sorted(root.rglob("*")):
        if any(path == k or k in path.parents for k in kept) or path.is_dir():
            continue
        files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def pull_refused(env, tmp_path, expected: str) -> None:
    before = tree_outside_the_cache(tmp_path, env)
    result = run_cli("pull", f"hf:{REPO}", env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    (line,) = [line for line in stderr.splitlines() if line and not line.startswith("downloading")]
    assert line.startswith("llamachat: error: ") and expected in line, line
    assert tree_outside_the_cache(tmp_path, env) == before
    assert (tmp_path / "outside" / "victim").read_bytes() == VICTIM
    assert run_cli("list", "--json", env=env).stdout.strip() == b"[]"


def test_a_linked_etag_that_climbs_out_of_the_cache_is_refused(hub, env, tmp_path, outside):
    blobs = storage(env) / "blobs"
    climb = os.path.relpath(outside / "pwned", blobs)
    hub.repos[REPO].lies.headers["model.safetensors"] = {"X-Linked-Etag": f'"{climb}"'}
    pull_refused(env, tmp_path, "ETag")
    assert not (outside / "pwned").exists() and not (outside / "pwned.incomplete").exists()


def test_an_absolute_etag_is_refused(hub, env, tmp_path, outside):
    hub.repos[REPO].lies.headers["config.json"] = {"ETag": f'"{outside / "pwned"}"'}
    pull_refused(env, tmp_path, "ETag")
    assert not (outside / "pwned").exists()


def test_an_etag_naming_an_existing_file_does_not_delete_it(hub, env, tmp_path, outside):
    """The ETag names a file that exists, so the pull used to take it for the download, find
    its checksum wrong and delete it as corrupt."""
    climb = os.path.relpath(outside / "victim", storage(env) / "blobs")
    hub.repos[REPO].lies.headers["model.safetensors"] = {"X-Linked-Etag": f'"{climb}"'}
    pull_refused(env, tmp_path, "ETag")


def test_a_tree_digest_used_as_a_file_name_is_checked(hub, env, tmp_path, outside):
    """Without an ETag the blob is named by the listing's git id: that is checked too."""
    climb = os.path.relpath(outside / "victim", storage(env) / "blobs")
    lies = hub.repos[REPO].lies
    lies.tree["config.json"] = {"oid": climb}
    lies.headers["config.json"] = {"ETag": '""'}
    pull_refused(env, tmp_path, "git blob id")


def test_a_commit_that_climbs_out_of_the_snapshots_is_refused(hub, env, tmp_path, outside):
    hub.repos[REPO].lies.commit = os.path.relpath(outside / "snapshot", storage(env) / "snapshots")
    pull_refused(env, tmp_path, "commit")
    assert not (outside / "snapshot").exists()


@pytest.mark.parametrize(
    "path", ["../../../outside/evil.json", "/etc/evil.json", "a\\..\\evil.json", "ok\0.json", ".."]
)
def test_an_unsafe_path_in_the_file_listing_is_refused(hub, env, tmp_path, outside, path):
    hub.repos[REPO].lies.extra_tree.append(
        {"type": "file", "path": path, "size": 2, "oid": "0" * 40}
    )
    pull_refused(env, tmp_path, "file path")


@pytest.mark.parametrize("size", [-1, "12", None, 1.5, True])
def test_a_nonsense_size_in_the_file_listing_is_refused(hub, env, tmp_path, outside, size):
    hub.repos[REPO].lies.tree["model.safetensors"] = {"size": size}
    pull_refused(env, tmp_path, "size")


def test_a_malformed_lfs_digest_is_refused(hub, env, tmp_path, outside):
    entry_lfs = {"oid": "../../x", "size": 10, "pointerSize": 134}
    hub.repos[REPO].lies.tree["model.safetensors"] = {"lfs": entry_lfs}
    pull_refused(env, tmp_path, "sha256")


def test_an_honest_hub_still_installs(hub, env):
    result = run_cli("pull", f"hf:{REPO}", env=env)
    assert result.returncode == 0, result.stderr.decode()
