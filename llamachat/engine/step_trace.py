"""A timeline of the batch scheduler's GPU steps, for benchmarks: with LLAMACHAT_STEP_TRACE set
to a file name, each step's kind, rows and prompt tokens, the host's time launching it, and when
the device began and ended it (CUDA events), written as JSON lines when the scheduler closes,
with a last line summing up how much of the time the device spent in steps."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

TRACE_ENV = "LLAMACHAT_STEP_TRACE"


@dataclass
class _Step:
    kind: str  # "decode" or "mixed"
    rows: int  # decoding rows
    prompt: int  # prompt tokens riding along
    launch_s: float  # host time spent launching it
    began: torch.cuda.Event
    ended: torch.cuda.Event


class StepTrace:
    def __init__(self, path: str):
        self.path = path
        self.steps: list[_Step] = []

    @classmethod
    def from_env(cls, device: torch.device) -> StepTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(f"{path}.{os.getpid()}") if path and device.type == "cuda" else None

    @contextmanager
    def step(self, kind: str, rows: int, prompt: int) -> Iterator[None]:
        """Around one step's launch; a launch that raises is not recorded."""
        began = torch.cuda.Event(enable_timing=True)
        began.record()
        started = time.perf_counter()
        yield
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self.steps.append(_Step(kind, rows, prompt, time.perf_counter() - started, began, ended))

    def write(self) -> None:
        if not self.steps:
            return
        torch.cuda.synchronize()
        origin = self.steps[0].began
        busy = {"decode": 0.0, "mixed": 0.0}
        counts = {"decode": 0, "mixed": 0}
        with open(self.path, "w", encoding="utf-8") as out:
            for step in self.steps:
                start = origin.elapsed_time(step.began)
                length = step.began.elapsed_time(step.ended)
                busy[step.kind] += length
                counts[step.kind] += 1
                line = {
                    "kind": step.kind,
                    "rows": step.rows,
                    "prompt": step.prompt,
                    "launch_ms": round(step.launch_s * 1000, 3),
                    "gpu_start_ms": round(start, 3),
                    "gpu_ms": round(length, 3),
                }
                out.write(json.dumps(line) + "\n")
            span = origin.elapsed_time(self.steps[-1].ended)
            summary = {"span_ms": span, "busy_ms": busy, "steps": counts}
            out.write(json.dumps({"summary": summary}) + "\n")


def traced(
    trace: StepTrace | None, kind: str, rows: int, prompt: int
) -> AbstractContextManager[None]:
    """`trace.step(...)`, or nothing when there is no trace."""
    return trace.step(kind, rows, prompt) if trace is not None else nullcontext()
