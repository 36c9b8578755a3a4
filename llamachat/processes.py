"""Whether another process still runs: the store and the history both ask, to tell work in
progress from what a killed process left behind.

A pid alone is not enough where a process may be gone for long: the system hands its number to
a later process. The history also records when its writer started (`process_started`), which
that later process does not share.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def process_started(pid: int) -> str | None:
    """When process `pid` started, as text that no other process with the same pid has (on this
    machine); None when it does not run or this system cannot tell."""
    if sys.platform.startswith("linux"):
        return _linux_started(pid)
    if sys.platform == "darwin":
        return _ps_started(pid)
    return None


_own: tuple[int, str | None] | None = None


def own_start() -> str | None:
    """process_started of this process, read once (again in a forked child)."""
    global _own
    if _own is None or _own[0] != os.getpid():
        _own = (os.getpid(), process_started(os.getpid()))
    return _own[1]


def process_running(pid: int | None, started: str | None) -> bool:
    """Whether the process recorded as `pid`, started at `started`, still runs. Without a start
    time (an older llamachat wrote the record, or this system cannot tell) the pid has to do."""
    if not pid_alive(pid):
        return False
    if started is None:
        return True
    now = process_started(pid)
    return now is None or now == started  # None: hidden from us (another user's), so alive


def _linux_started(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # Field 22 is the start time in clock ticks since boot (so the boot's id goes with it); the
    # command name, field 2, is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{boot}:{fields[19]}"


def _ps_started(pid: int) -> str | None:
    try:
        result = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)],
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    started = result.stdout.strip()
    return started if result.returncode == 0 and started else None
