"""Small filesystem helpers shared by the store's sources."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..processes import pid_alive


def is_safe_relative_path(path: str) -> bool:
    """Whether `path` (from a server or a file) names a place strictly inside a folder: POSIX
    separators only, no empty, '.' or '..' part, not absolute, no NUL or backslash."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def owner_pid(path: Path) -> int | None:
    """The pid in a NAME.PID file name, as the store names its temporary folders."""
    _, _, pid = path.name.rpartition(".")
    return int(pid) if pid.isdigit() else None


def clear_dead(folder: Path, pattern: str) -> None:
    """Delete what dead processes left behind: entries NAME.PID whose PID no longer runs."""
    for path in folder.glob(pattern):
        pid = owner_pid(path)
        if pid is not None and not pid_alive(pid):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (no second copy of a 16 GB file), else a copy."""
    source = source.resolve()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
