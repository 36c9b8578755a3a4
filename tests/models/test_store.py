"""The model store on its own: staging, the one rename that installs, and what killed processes
leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamachat.models.errors import (
    BrokenModelError,
    BusyError,
    ManifestError,
    ModelNotFoundError,
    StoreError,
)
from llamachat.models.manifest import Manifest, file_records
from llamachat.models.store import BrokenModel, ModelStore
from tests.models.broken_manifests import BROKEN_MANIFESTS


def stage(staging, name: str, text: str = "weights") -> None:
    (staging.path / "model.safetensors").write_text(text)
    staging.manifest = Manifest(
        name=name,
        source="test",
        revision=None,
        files=file_records(staging.path),
        chat_format="model",
        parameters=1,
        context_length=16,
        weights="float32",
    )


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_model_appears_only_when_its_install_completes(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
        assert store.installed() == []
    (model,) = store.installed()
    assert model.name == "alpha" and (model.path / "model.safetensors").read_text() == "weights"


def test_a_failed_install_leaves_nothing(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError), store.install("alpha") as staging:
        stage(staging, "alpha")
        raise RuntimeError("network down")
    assert store.installed() == []
    assert not [p for p in (tmp_path / ".staging").glob("alpha.*") if p.is_dir()]


def test_reinstalling_replaces_the_old_model_whole(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha", "old")
    with store.install("alpha") as staging:
        stage(staging, "alpha", "new")
    (model,) = store.installed()
    assert (model.path / "model.safetensors").read_text() == "new"
    assert not [p for p in (tmp_path / ".trash").iterdir()]


def test_leftovers_of_killed_installs_are_cleared(tmp_path):
    store = ModelStore(tmp_path)
    stale = tmp_path / ".staging" / f"beta.{dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    assert not stale.exists()
    assert [m.name for m in store.installed()] == ["alpha"]


def test_a_replacement_killed_between_its_renames_is_rolled_back(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha", "old")
    # As if killed right after moving the old model aside, before moving the new one in.
    trash = tmp_path / ".trash"
    trash.mkdir()
    os.replace(tmp_path / "alpha", trash / f"alpha.{dead_pid()}")
    assert store.installed() == []
    with store.install("other") as staging:
        stage(staging, "other")
    assert sorted(m.name for m in store.installed()) == ["alpha", "other"]
    assert (tmp_path / "alpha" / "model.safetensors").read_text() == "old"


def test_remove_takes_the_model_out_in_one_step(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    store.remove("alpha")
    assert store.installed() == []
    with pytest.raises(ModelNotFoundError):
        store.remove("alpha")


def test_unknown_names_get_close_matches(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("smollm2") as staging:
        stage(staging, "smollm2")
    with pytest.raises(ModelNotFoundError) as raised:
        store.get("smollm")
    assert raised.value.suggestions == ["smollm2"]
    assert "llamachat list" in str(raised.value)


def test_folders_without_a_manifest_are_not_models(tmp_path):
    (tmp_path / "half-copied").mkdir()
    (tmp_path / "half-copied" / "config.json").write_text("{}")
    assert ModelStore(tmp_path).installed() == []


@pytest.mark.parametrize("name", ["", "UPPER", "../escape", "a/b", ".hidden", "x" * 65])
def test_invalid_names_are_refused(tmp_path, name):
    with pytest.raises(StoreError), ModelStore(tmp_path).install(name):
        pass


def test_two_installs_of_one_name_cannot_run_at_once(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
        with pytest.raises(BusyError), store.install("alpha"):
            pass


def test_latest_is_the_most_recently_installed(tmp_path):
    store = ModelStore(tmp_path)
    for name, when in (("old", "2026-01-01T00:00:00+00:00"), ("new", "2026-06-01T00:00:00+00:00")):
        with store.install(name) as staging:
            stage(staging, name)
            staging.manifest = Manifest(**{**staging.manifest.__dict__, "installed_at": when})
    assert store.latest().name == "new"


def test_recording_a_weight_format_rewrites_only_the_manifest(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    before = store.get("alpha").manifest
    assert before.quantization is None
    (tmp_path / ".staging" / f"alpha.manifest.{dead_pid()}").write_text("{")  # a killed rewrite
    updated = store.set_quantization("alpha", "int4")
    assert updated.manifest.quantization == "int4"
    assert store.get("alpha").manifest == updated.manifest
    assert updated.manifest.files == before.files
    assert updated.manifest.installed_at == before.installed_at
    assert (tmp_path / "alpha" / "model.safetensors").read_text() == "weights"
    assert sorted(p.name for p in (tmp_path / ".staging").iterdir()) == ["alpha.lock"]


def test_a_weight_format_is_not_recorded_while_the_model_is_being_installed(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    with store.install("alpha") as staging:
        stage(staging, "alpha", "new")
        with pytest.raises(BusyError):
            store.set_quantization("alpha", "int8")
    assert store.get("alpha").manifest.quantization is None


def test_a_manifest_written_before_weight_formats_existed_still_reads(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    path = tmp_path / "alpha" / "manifest.json"
    data = json.loads(path.read_text())
    del data["quantization"]
    path.write_text(json.dumps(data))
    assert store.get("alpha").manifest.quantization is None


@pytest.mark.parametrize("kind", list(BROKEN_MANIFESTS))
def test_a_broken_manifest_makes_a_broken_model_that_can_be_removed(tmp_path, kind):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    path = tmp_path / "alpha" / "manifest.json"
    path.write_bytes(BROKEN_MANIFESTS[kind](json.loads(path.read_text())))
    with pytest.raises(ManifestError):
        Manifest.read(tmp_path / "alpha")
    assert store.installed() == []
    (entry,) = store.scan()
    assert isinstance(entry, BrokenModel) and entry.name == "alpha"
    with pytest.raises(BrokenModelError, match="alpha is broken: manifest.json .*llamachat rm"):
        store.get("alpha")
    store.remove("alpha")
    assert store.scan() == [] and not (tmp_path / "alpha").exists()


def test_a_broken_manifest_is_replaced_by_the_next_install(tmp_path):
    store = ModelStore(tmp_path)
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "manifest.json").write_text("{")
    with store.install("alpha") as staging:
        stage(staging, "alpha", "new")
    assert store.get("alpha").manifest.name == "alpha"


def test_unknown_manifest_keys_are_ignored(tmp_path):
    store = ModelStore(tmp_path)
    with store.install("alpha") as staging:
        stage(staging, "alpha")
    before = store.get("alpha").manifest
    path = tmp_path / "alpha" / "manifest.json"
    data = json.loads(path.read_text())
    data["from_the_future"] = [1, 2]
    data["files"][0]["xattrs"] = {}
    path.write_text(json.dumps(data))
    assert store.get("alpha").manifest == before


def test_a_catalog_name_that_is_not_installed_is_offered_for_pulling(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFoundError) as close:
        store.get("tinylama")
    assert close.value.suggestions == ["tinyllama"]
    assert "`llamachat pull tinyllama` installs it" in str(close.value)
    with pytest.raises(ModelNotFoundError) as exact:
        store.get("smollm2-360m")
    assert "'smollm2-360m' is not installed: `llamachat pull smollm2-360m`" in str(exact.value)
    with pytest.raises(ModelNotFoundError) as unknown:
        store.get("zzzz")
    assert "pull" not in str(unknown.value) and "llamachat list" in str(unknown.value)
