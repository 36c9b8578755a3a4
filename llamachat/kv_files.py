"""The saved KV caches on disk (issue 14, instant resume): a folder of files, one per
conversation and model, under a disk budget, the least recently used removed first.

This module only names, lists, sizes, evicts and removes the files; writing and reading them
is the engine's (engine/saved_cache.py, which checks a file's identity, token ids and checksum).
It loads no torch: `llamachat history` and `llamachat cache` use it without the engine.

A file is named CONVERSATION-IDENTITY.safetensors: the conversation's id (the front end's key)
and a hash of what the keys and values were computed with (model, its install, weight format,
dtype). Its modification time is when it was last saved or loaded: eviction goes by it (access
times are not kept by many file systems).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .history.db import NEARLY_FULL_BYTES
from .private import private_dir

DEFAULT_BUDGET = 2 * 10**9  # bytes: what `kv_disk_budget` is when the config does not set it
SUFFIX = ".safetensors"
_NAME = re.compile(r"(?P<key>[A-Za-z0-9_]+)-(?P<identity>[0-9a-f]{16})\.safetensors")
_SIZE = re.compile(r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]i?b?|b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from a size as a user types it: 4GB, 500MB, 1.5GiB, 0, 123456 (bytes); decimal
    units (GB = 10**9) unless written with an i (GiB = 2**30). Raises ValueError."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (say 2GB, 500MB or 0)")
    unit = (match["unit"] or "").lower().removesuffix("b")
    scale = _UNITS[unit[0] if unit else ""]
    if unit.endswith("i"):
        scale = 2 ** (10 * "bkmgt".index(unit[0]))
    return int(float(match["number"]) * scale)


def format_size(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class SavedFile:
    path: Path
    key: str  # the front end's key: a conversation's id
    size: int  # bytes
    used_at: float  # when it was last saved or loaded (its mtime), seconds since the epoch


@dataclass(frozen=True)
class ContextFiles:
    """The folder of saved KV caches and its budget in bytes (0: nothing is saved)."""

    folder: Path
    budget: int = DEFAULT_BUDGET

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def path_for(self, key: str, identity: dict[str, str]) -> Path:
        """Where the cache of conversation `key` computed with `identity` goes (the folder is
        made, 0700). Raises ValueError for a key that is not letters, digits and _."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise ValueError(f"a saved cache's key must be letters, digits or _, not {key!r}")
        private_dir(self.folder)
        return self.folder / f"{key}-{identity_hash(identity)}{SUFFIX}"

    def files(self) -> list[SavedFile]:
        """The saved caches, the most recently used first (unfinished temporary files and
        anything else in the folder are left out)."""
        found = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = _NAME.fullmatch(entry.name)
            if match is None:
                continue
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile
                continue
            found.append(SavedFile(Path(entry.path), match["key"], status.st_size, status.st_mtime))
        return sorted(found, key=lambda f: f.used_at, reverse=True)

    def sizes_by_key(self) -> dict[str, int]:
        """Bytes saved for each key (a conversation may have caches of several models)."""
        sizes: dict[str, int] = {}
        for saved in self.files():
            sizes[saved.key] = sizes.get(saved.key, 0) + saved.size
        return sizes

    def fits(self, size: int) -> bool:
        """Whether a file of `size` bytes may be saved at all under the budget."""
        return 0 < size <= self.budget

    def evict(self, keep: Path | None = None) -> list[SavedFile]:
        """Remove the least recently used files until the rest fit the budget (`keep`, the one
        just written, goes last: only if it alone is over); the files removed."""
        files = self.files()
        if keep is not None:  # the newest in any case; put it first whatever the clock says
            files.sort(key=lambda f: f.path != keep)
        total, removed = 0, []
        for saved in files:
            total += saved.size
            if total > self.budget:
                saved.path.unlink(missing_ok=True)
                removed.append(saved)
        return removed

    def clear(self) -> list[SavedFile]:
        """Remove every saved cache (and temporary files left by a crash); those removed."""
        removed = self.files()
        for saved in removed:
            saved.path.unlink(missing_ok=True)
        try:
            for entry in os.scandir(self.folder):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
        except FileNotFoundError:
            pass
        return removed

    def remove_key(self, key: str) -> list[SavedFile]:
        """Remove the saved caches of conversation `key` (it was deleted)."""
        removed = [saved for saved in self.files() if saved.key == key]
        for saved in removed:
            saved.path.unlink(missing_ok=True)
        return removed

    @staticmethod
    def touch(path: Path) -> None:
        """Mark `path` as just used, for eviction. Best effort."""
        try:
            now = time.time()
            os.utime(path, (now, now))
        except OSError:
            pass


def identity_hash(identity: dict[str, str]) -> str:
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def nearly_full(folder: Path) -> bool:
    """Whether the disk that holds `folder` has (all but) no room left, as the history judges
    a full disk."""
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False
