"""How many threads PyTorch's CPU kernels use.

PyTorch's default is every core, and its kernels split each operation across all of them and
wait for the slowest: with one core taken by another process, every one of the ~1,000
operations of a decode step waits for a scheduler time slice, and SmolLM2 fell from ~30 to 1.4
tokens/s on two cores. A decode step is bound by memory bandwidth, which a few threads already
saturate, so the default leaves one physical core to the rest of the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import DeviceError

_CPUS = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (Linux's topology files;
    elsewhere every logical CPU counts)."""
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
    return max(1, len(cores))


def default_threads() -> int:
    return max(1, physical_cores() - 1)


def use_threads(count: int | None) -> int:
    """Set PyTorch's CPU thread count (the whole process shares it); None: the default."""
    chosen = default_threads() if count is None else count
    if chosen < 1:
        raise DeviceError(f"threads must be at least 1, not {chosen}")
    torch.set_num_threads(chosen)
    return chosen
