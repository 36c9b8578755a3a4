"""User data is private, as ssh keeps ~/.ssh and gpg ~/.gnupg: llamachat's folders are made 0700
and its files 0600 whatever the umask, and an existing one that others could read is tightened
when llamachat opens it (installs made before this rule were 0755 and 0644).

Only what this user owns is tightened, and never a symbolic link (a folder deliberately shared
through one stays as the user set it up) nor a sticky folder such as /tmp.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parent 0700, or tighten it if it exists; returns it."""
    missing = []
    folder = path
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(folder, FOLDER_MODE)  # the umask may have taken bits off
    tighten(path)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and 0600 if it is missing, or tighten it if it exists; returns it."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        tighten(path)
        return path
    try:
        os.fchmod(descriptor, FILE_MODE)
    finally:
        os.close(descriptor)
    return path


def tighten(path: Path) -> None:
    """Take the group's and others' permissions off `path` if this user owns it. Best effort: a
    read-only file system or a file that vanished leaves things as they are."""
    try:
        status = os.lstat(path)
        mode = stat.S_IMODE(status.st_mode)
        if (
            status.st_uid != os.geteuid()
            or stat.S_ISLNK(status.st_mode)
            or mode & stat.S_ISVTX
            or not mode & 0o077
        ):
            return
        os.chmod(path, mode & (FOLDER_MODE if stat.S_ISDIR(status.st_mode) else FILE_MODE))
    except OSError:
        pass


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (a crash mid-write leaves the old file), the file
    0600 in a 0700 folder."""
    private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with open(descriptor, "wb") as file:
            os.fchmod(descriptor, FILE_MODE)
            file.write(data)
            file.flush()
            os.fsync(descriptor)  # the new text is on disk before it replaces the old
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
