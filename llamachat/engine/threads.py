"""How many threads PyTorch's CPU kernels use.

PyTorch's kernels split each operation across their threads and wait for the slowest, so a
thread that shares its core with another busy process holds up every one of the ~1,000
operations of a decode step: SmolLM2 on two cores decodes at 35 tokens/s on both, and at 14
with one core taken by another process, where one thread still gives 24. So the default is the
cores that other processes leave idle: measured at load time (over the load itself) and again
before each reply (over the time since the last one), from the system's CPU counters less this
process's own time. `--threads N`, or OMP_NUM_THREADS, fixes the count instead: the count
changes the order of the sums in PyTorch's reductions, so a fixed one is what makes a seeded
answer repeat exactly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DeviceError

_CPUS = Path("/sys/devices/system/cpu")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (Linux's topology files;
    elsewhere every logical CPU counts), and no more than a cgroup CPU quota allows."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        topology = _CPUS / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", str(cpu)))
            continue
        cores.add((package, core))
    return max(1, min(len(cores), _cgroup_quota() or len(cores)))


def _cgroup_quota() -> int | None:
    """The CPUs a cgroup v2 quota (`cpu.max`, as containers set it) allows, rounded up."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):  # no cgroup v2, or "max": no quota
        return None


@dataclass(frozen=True)
class _Sample:
    wall_s: float
    system_busy_s: float | None  # every CPU's non-idle time (None: not Linux)
    own_s: float  # this process's CPU time, all its threads


def _sample() -> _Sample:
    own = os.times()
    return _Sample(time.monotonic(), _system_busy_s(), own.user + own.system)


def _system_busy_s() -> float | None:
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu  user nice system idle iowait irq softirq steal ...: all but idle and iowait
    ticks = [int(value) for value in first[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


# The counters tick every 10 ms: a shorter window says little. The first measurement waits out
# the rest of one (only a load faster than this, as a tiny test model's, waits at all).
MIN_WINDOW_S = 0.1


class AutoThreads:
    """The default thread count, kept up to date: `retune()` sets PyTorch's count to the
    physical cores less those other processes kept busy since the last measurement."""

    def __init__(self) -> None:
        self.cores = physical_cores()
        self.count = self.cores
        self._last = _sample()
        self._measured = False

    def retune(self) -> int:
        now = _sample()
        if not self._measured and now.wall_s - self._last.wall_s < MIN_WINDOW_S:
            time.sleep(MIN_WINDOW_S - (now.wall_s - self._last.wall_s))
            now = _sample()
        elapsed = now.wall_s - self._last.wall_s
        known = now.system_busy_s is not None and self._last.system_busy_s is not None
        if known and elapsed >= MIN_WINDOW_S:  # else keep the count, and widen the window
            system = now.system_busy_s - self._last.system_busy_s  # type: ignore[operator]
            others = system - (now.own_s - self._last.own_s)
            self.count = max(1, self.cores - round(max(0.0, others) / elapsed))
            self._last, self._measured = now, True
        torch.set_num_threads(self.count)
        return self.count


def cpu_threads(device: torch.device, count: int | None) -> int | AutoThreads | None:
    """What a model being made on `device` will run PyTorch's CPU kernels with: `count`, set
    now; else OMP_NUM_THREADS where the user set it (as PyTorch itself honours it); else the
    default, measured from now until the model is made (AutoThreads); None on a GPU."""
    if device.type != "cpu":
        return None
    if count is None:
        count = _omp_num_threads()
    return AutoThreads() if count is None else use_threads(count)


def _omp_num_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def use_threads(count: int) -> int:
    """Set PyTorch's CPU thread count (the whole process shares it)."""
    if count < 1:
        raise DeviceError(f"threads must be at least 1, not {count}")
    torch.set_num_threads(count)
    return count
