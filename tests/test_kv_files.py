"""The saved KV caches as files (kv_files.py, no torch): sizes as typed, listing by key, the
budget's least-recently-used eviction, clearing, and the config key that sets the budget."""

from __future__ import annotations

import os
import stat

import pytest

from llamachat.kv_files import DEFAULT_BUDGET, ContextFiles, parse_size
from llamachat.settings import Settings, SettingsError, load, parse_value, save

IDENTITY = {"model": "tiny"}


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GB", 4 * 10**9),
        ("500MB", 500 * 10**6),
        ("500 mb", 500 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("64k", 64_000),
        ("0", 0),
        ("123456", 123_456),
        ("10B", 10),
    ],
)
def test_sizes_are_read_as_typed(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GB", "4 GBs", "", "1e9"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def write(files: ContextFiles, key: str, size: int, used_at: float) -> None:
    path = files.path_for(key, IDENTITY)
    path.write_bytes(b"x" * size)
    os.utime(path, (used_at, used_at))


def test_eviction_keeps_the_most_recently_used_within_the_budget(tmp_path):
    files = ContextFiles(tmp_path / "kv", budget=250)
    for key, used_at in (("1", 1000), ("2", 3000), ("3", 2000)):
        write(files, key, 100, used_at)
    removed = files.evict()
    assert [f.key for f in removed] == ["1"]
    assert [f.key for f in files.files()] == ["2", "3"]  # the most recently used first


def test_the_file_just_written_is_kept_over_older_ones_whatever_its_clock(tmp_path):
    files = ContextFiles(tmp_path / "kv", budget=150)
    write(files, "1", 100, 5000)
    write(files, "2", 100, 1000)
    files.evict(keep=files.path_for("2", IDENTITY))
    assert [f.key for f in files.files()] == ["2"]


def test_clear_removes_every_saved_cache_and_leftovers_and_nothing_else(tmp_path):
    files = ContextFiles(tmp_path / "kv")
    write(files, "1", 10, 1000)
    write(files, "2", 20, 1000)
    (files.folder / ".1-0123456789abcdef.safetensors.99.tmp").write_bytes(b"half")
    (files.folder / "notes.txt").write_text("mine")
    assert sorted(f.size for f in files.clear()) == [10, 20]
    assert os.listdir(files.folder) == ["notes.txt"]
    assert files.sizes_by_key() == {}


def test_sizes_are_summed_by_conversation(tmp_path):
    files = ContextFiles(tmp_path / "kv")
    write(files, "1", 10, 1000)
    files.path_for("1", {"model": "other"}).write_bytes(b"y" * 5)
    write(files, "2", 7, 1000)
    assert files.sizes_by_key() == {"1": 15, "2": 7}


def test_the_folder_is_private(tmp_path):
    files = ContextFiles(tmp_path / "cache" / "kv")
    files.path_for("1", IDENTITY)
    assert stat.S_IMODE(os.stat(files.folder).st_mode) == 0o700


def test_a_key_is_a_plain_name():
    with pytest.raises(ValueError):
        ContextFiles(os.devnull).path_for("../1", IDENTITY)


def test_the_budget_key_takes_a_size_and_defaults_to_2gb(tmp_path):
    assert Settings().kv_disk_budget_bytes == DEFAULT_BUDGET == 2 * 10**9
    assert parse_value("kv_disk_budget", "4GB") == "4GB"
    with pytest.raises(SettingsError, match="not a size") as refused:
        parse_value("kv_disk_budget", "lots")
    assert refused.value.exit_code == 2
    path = tmp_path / "config.toml"
    save(path, Settings(kv_disk_budget="500MB"))
    assert load(path).kv_disk_budget_bytes == 500 * 10**6
    path.write_text("kv_disk_budget = 0\n")
    assert load(path).kv_disk_budget_bytes == 0
