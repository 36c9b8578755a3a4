"""A timeline of the batch scheduler's GPU steps, for benchmarks: with LLAMACHAT_STEP_TRACE set
to a file name, each step's kind, rows and prompt tokens, when the host began launching it and
for how long, and when the device began and ended it (CUDA events); and each request's times on
the host: submitted, given a slot, first token taken. Written as JSON lines when the scheduler
closes (host times in ms from the first step's launch), with a last line summing up how much of
the time the device spent in steps."""

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
    host_start: float  # perf_counter when its launch began
    launch_s: float  # host time spent launching it
    began: torch.cuda.Event
    ended: torch.cuda.Event


@dataclass
class _Request:
    prompt: int  # tokens
    reused: int  # of them, found in the cache
    submitted: float  # perf_counter times
    admitted: float
    first_token: float


class StepTrace:
    def __init__(self, path: str):
        self.path = path
        self.steps: list[_Step] = []
        self.requests: list[_Request] = []

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
        self.steps.append(
            _Step(kind, rows, prompt, started, time.perf_counter() - started, began, ended)
        )

    def request(
        self, prompt: int, reused: int, submitted: float, admitted: float, first_token: float
    ) -> None:
        """A request's first token was taken (on the scheduler's thread, as steps are)."""
        self.requests.append(_Request(prompt, reused, submitted, admitted, first_token))

    def write(self) -> None:
        if not self.steps:
            return
        torch.cuda.synchronize()
        origin = self.steps[0].began
        host_origin = self.steps[0].host_start

        def host_ms(at: float) -> float:
            return round((at - host_origin) * 1000, 3)

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
                    "host_ms": host_ms(step.host_start),
                    "launch_ms": round(step.launch_s * 1000, 3),
                    "gpu_start_ms": round(start, 3),
                    "gpu_ms": round(length, 3),
                }
                out.write(json.dumps(line) + "\n")
            for request in self.requests:
                line = {
                    "kind": "request",
                    "prompt": request.prompt,
                    "reused": request.reused,
                    "submitted_ms": host_ms(request.submitted),
                    "admitted_ms": host_ms(request.admitted),
                    "first_token_ms": host_ms(request.first_token),
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
