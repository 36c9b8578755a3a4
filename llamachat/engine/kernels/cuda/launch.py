"""What every Triton kernel of the decode step shares at launch (CUDA): programmatic dependent
launch inside a CUDA graph on Hopper and later, and whether the Triton interpreter runs them.

Each decode kernel takes a `PDL` constexpr, calls `await_previous_kernel(PDL)` first, and is
launched with `**launch_options()`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The Triton interpreter (TRITON_INTERPRET=1, used to check these kernels on a CPU) runs no PTX.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _programmatic_launch() -> bool:
    """Programmatic dependent launch (Hopper and later): a kernel is launched while the one
    before it in the stream is still finishing and waits at its first instruction
    (`griddepcontrol.wait`) rather than behind the launch queue. A decode step is ~300 kernels,
    most of them a few microseconds long, so their launch gaps add up. LLAMACHAT_PDL=0 turns
    it off."""
    if _INTERPRETED or os.environ.get("LLAMACHAT_PDL") == "0" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


_PDL = _programmatic_launch()


def launch_options() -> dict[str, bool]:
    """The PDL constexpr and launch option for a decode kernel: only inside a CUDA graph being
    captured, where the GPU runs the kernels back to back. Launched one by one from Python, a
    kernel starts long after the one before has finished: nothing to overlap."""
    if _PDL and torch.cuda.is_current_stream_capturing():
        return {"PDL": True, "launch_pdl": True}
    return {}


@triton.jit
def await_previous_kernel(PDL: tl.constexpr):
    # Every decode kernel reads what the previous one wrote: wait for it, then let the next
    # kernel start launching.
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
