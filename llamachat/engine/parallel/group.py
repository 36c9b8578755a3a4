"""The processes of a tensor-parallel model: rank 0 is the caller's (the CLI, the app, the
server), ranks 1…N-1 are started here, one per GPU (`python -m llamachat.engine.parallel.worker`),
and follow it: every call rank 0's Transformer makes that runs the model (a forward pass, rotary
tables for a longer window) is broadcast to them first, so all ranks run the same kernels and
meet at the same collectives. Each rank keeps its own KV caches, by the id rank 0 gives them.

Tensors go over NCCL on GPUs (gloo on CPUs, as the tests run it); commands over a gloo group.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import EngineError
from ..kv_cache import KVCache
from ..loading import DTYPE_BY_NAME
from ..model import Transformer

# Commands wait for the user between turns: no timeout a chat would run into. A rank that dies
# closes its connections, which the others see at once.
IDLE = timedelta(days=365)
STARTED_WITHIN_S = 600.0  # for every rank to load its part (a 70B model over 8 GPUs)
PROBES = 200  # all-reduces timed by Leader.all_reduce_seconds


@dataclass(frozen=True)
class Launch:
    """What a rank needs to load its part; the same for every rank but its number."""

    folder: str | None  # None: random weights of `shape`
    weights_folder: str | None
    device: str  # "cpu" or "cuda" (rank r takes GPU r)
    dtype: str
    quantization: str | None
    world: int
    shape: str | None = None  # random_weights.SHAPES, for benchmarks

    def device_of(self, rank: int) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        # Ranks past the GPUs share them (only the GPU tests ask for that, on one GPU).
        return torch.device("cuda", rank % torch.cuda.device_count())

    @property
    def backend(self) -> str:
        """NCCL where every rank has a GPU of its own; else gloo (CPUs, or ranks sharing a GPU,
        which NCCL refuses), which takes CUDA tensors too, through the host."""
        if self.device == "cuda" and self.world <= torch.cuda.device_count():
            return "nccl"
        return "gloo"


class Leader:
    """Rank 0's side: tells the followers what to run (Transformer.forward and setup_rope call
    it first), and stops them at exit."""

    def __init__(self, processes: list[subprocess.Popen[bytes]], control: Any):
        self.world = len(processes) + 1
        self._processes = processes
        self._control = control
        self._lock = threading.RLock()  # one call at a time runs on every rank, in order
        self._cache_ids: dict[int, int] = {}  # id(KVCache) → the id the followers know it by
        self._dropped: list[int] = []  # caches gone since the last command
        self._next_id = 0
        self._closed = False
        # A call that stopped halfway on rank 0 (Ctrl+C, an error) leaves the others inside a
        # collective it never reaches: they can only be stopped by force then.
        self._broken = False
        atexit.register(self.close)

    @contextmanager
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attend_len: int,
        last_only: bool,
    ) -> Iterator[None]:  # fmt: skip
        """Around rank 0's forward pass: the followers start the same one with their caches."""
        with self._lock:
            self._send(
                "forward", self._cache_id(cache), tokens.tolist(), positions.tolist(), attend_len,
                last_only,
            )  # fmt: skip
            try:
                yield
            except BaseException:
                self._broken = True
                raise

    def setup_rope(self, max_len: int) -> None:
        with self._lock:
            self._send("rope", max_len)

    def all_reduce_seconds(self, width: int, dtype: torch.dtype, device: torch.device) -> float:
        """Seconds one all-reduce of a (1, width) row takes over the ranks, timed alone (a
        decode step has two a layer and the embedding's): what the split costs a token."""
        with self._lock:
            self._send("probe", width, str(dtype).removeprefix("torch."))
            return _time_all_reduces(width, dtype, device)

    def _cache_id(self, cache: KVCache) -> int:
        key = id(cache)
        if key not in self._cache_ids:
            self._next_id += 1
            self._cache_ids[key] = self._next_id
            self._send("cache", self._next_id, cache.max_len)
            weakref.finalize(cache, self._forget, key)
        return self._cache_ids[key]

    def _forget(self, key: int) -> None:
        # Called by the garbage collector, perhaps in the middle of a collective: the followers
        # drop the cache with the next command.
        self._dropped.append(self._cache_ids.pop(key))

    def _send(self, *command: Any) -> None:
        if self._closed:
            raise EngineError("the tensor-parallel ranks were stopped")
        if self._broken:
            raise EngineError("the tensor-parallel ranks are out of step: load the model again")
        dropped, self._dropped = self._dropped, []
        dist.broadcast_object_list([(dropped, command)], src=0, group=self._control)

    def close(self) -> None:
        """Stop the followers and leave the process group (at exit, or to load another)."""
        with self._lock:
            if self._closed:
                return
            if self._broken:
                for process in self._processes:
                    process.kill()
            else:
                try:
                    self._send("stop")
                except Exception:  # a follower already gone: stop the rest below
                    pass
            self._closed = True
            dist.destroy_process_group()
            for process in self._processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            atexit.unregister(self.close)


def start_followers(launch: Launch, store: Any) -> list[subprocess.Popen[bytes]]:
    """Ranks 1…N-1 as processes loading their parts; their stdout is closed (stdout is for
    answers), their stderr is ours."""
    processes = []
    for rank in range(1, launch.world):
        arguments = json.dumps({**launch.__dict__, "rank": rank, "port": store.port})
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "llamachat.engine.parallel.worker", arguments],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "LLAMACHAT_PARENT_PID": str(os.getpid())},
            )
        )
    return processes


def master_store(world: int) -> Any:
    """The rendezvous every rank meets at, on a free loopback port."""
    if dist.is_initialized():
        raise EngineError("one tensor-parallel model at a time: close the first one")
    return dist.TCPStore(
        "127.0.0.1", 0, world, is_master=True, timeout=IDLE, wait_for_workers=False
    )


def join(launch: Launch, rank: int, store: Any) -> Any:
    """Enter the process group as `rank` (once its part is loaded); returns the control group."""
    backend = launch.backend
    if launch.device == "cuda":
        torch.cuda.set_device(launch.device_of(rank))
    if backend == "nccl":
        # NVLink multicast (NVLS) off unless the environment says otherwise: the multi-GPU
        # machines this was written for must run NCCL without it (their documentation).
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(backend, store=store, rank=rank, world_size=launch.world, timeout=IDLE)
    return dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=IDLE)


def await_followers(store: Any, processes: list[subprocess.Popen[bytes]]) -> None:
    """Wait until every follower has loaded its part; EngineError if one exits first (the
    caller stops the others)."""
    deadline = time.monotonic() + STARTED_WITHIN_S
    for rank, process in enumerate(processes, start=1):
        while not store.check([f"loaded/{rank}"]):
            code = process.poll()
            if code is not None:
                raise EngineError(
                    f"tensor-parallel rank {rank} stopped while loading (exit {code}): "
                    "its message is above"
                )
            if time.monotonic() > deadline:
                raise EngineError(
                    f"tensor-parallel rank {rank} did not load within "
                    f"{STARTED_WITHIN_S / 60:.0f} minutes"
                )
            time.sleep(0.05)


def follow(transformer: Transformer, launch: Launch, rank: int, control: Any) -> None:
    """A follower's loop: run what rank 0 runs, with this rank's caches, until it says stop."""
    device, dtype = launch.device_of(rank), transformer.tok_embeddings.weight.dtype
    caches: dict[int, KVCache] = {}
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        dropped, (kind, *args) = message[0]
        for cache_id in dropped:
            caches.pop(cache_id, None)
        if kind == "stop":
            return
        if kind == "rope":
            transformer.setup_rope(args[0])
        elif kind == "cache":
            cache_id, max_len = args
            caches[cache_id] = KVCache(transformer.config, max_len, device, dtype)
        elif kind == "probe":
            _time_all_reduces(args[0], DTYPE_BY_NAME[args[1]], device)
        elif kind == "forward":
            cache_id, tokens, positions, attend_len, last_only = args
            with torch.inference_mode():
                transformer(
                    torch.tensor(tokens, device=device), torch.tensor(positions, device=device),
                    caches[cache_id], attend_len, last_only,
                )  # fmt: skip
        else:
            raise EngineError(f"unknown tensor-parallel command {kind!r}")


def _time_all_reduces(width: int, dtype: torch.dtype, device: torch.device) -> float:
    row = torch.zeros((1, width), dtype=dtype, device=device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(10):  # warm: the first collectives set up their connections and buffers
        dist.all_reduce(row)
    synchronize()
    started = time.perf_counter()
    for _ in range(PROBES):
        dist.all_reduce(row)
    synchronize()
    return (time.perf_counter() - started) / PROBES


def launch_parent() -> int:
    return int(os.environ.get("LLAMACHAT_PARENT_PID", "0"))


def exit_with_parent() -> None:
    # A follower outlives nothing: if rank 0's process is gone, so is this one.
    parent = launch_parent()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    if parent:
        threading.Thread(target=watch, daemon=True).start()
