"""Speed measurements of the engine: what `llamachat bench` and benchmarks/gpu_bench.py print.

Speed does not depend on the weights' values, so models of the real shapes are made with random
weights right on the device (no download). Times on a GPU are taken after a synchronize; every
figure is the median of several runs.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .chat_format import BUILTIN_FORMATS
from .chat_model import ChatModel
from .decode import choose_decode_step, choose_logits
from .quantize import check_quantization, weight_bytes
from .random_weights import SHAPES, random_transformer, shape_config
from .sampling import GREEDY
from .session import ChatSession, GenerationStats
from .threads import cpu_threads

__all__ = ["SHAPES", "BenchResult", "copy_bandwidth", "measure", "random_model"]


@dataclass
class BenchResult:
    name: str
    device: str
    dtype: str
    quantization: str | None
    weight_bytes: int
    kv_bytes_per_token: int
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # by context length
    ttft_new_turn_reused_ms: float = 0.0
    ttft_new_turn_full_ms: float = 0.0
    history_tokens: int = 0
    peak_memory_bytes: int = 0
    # Split over several GPUs: how many, and the all-reduces' time a decode step (two a layer
    # and the embedding's, timed alone). weight_bytes and kv_bytes_per_token are then rank 0's
    # share, so bandwidth_share with one GPU's bandwidth is the share of the GPUs' together.
    gpus: int = 1
    all_reduce_ms_per_token: float | None = None

    def bandwidth_share(self, context: int, copy_bytes_per_s: float) -> float:
        """Decode speed × bytes each token must read, over the measured copy bandwidth."""
        per_token = self.weight_bytes + self.kv_bytes_per_token * context
        return self.decode_tokens_per_s[context] * per_token / copy_bytes_per_s


def random_model(
    shape: str,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    quantization: str | None = None,
    threads: int | None = None,
    gpus: int = 1,
) -> ChatModel:
    """A model of `shape` with random weights (N(0, 0.02), norms at 1) made on `device`. With a
    quantisation each matrix is quantised as it is made, so a 70B model fits one GPU in int4.
    `threads` as for ChatModel.load; `gpus`: split over that many GPUs (tensor parallel), each
    rank making its own part."""
    config = shape_config(shape)
    threads_used = cpu_threads(torch.device(device), threads)
    check_quantization(quantization, torch.device(device), dtype)
    if gpus > 1:
        from .parallel.group import Launch
        from .parallel.load import check_gpus, load_parallel

        check_gpus(torch.device(device), gpus)
        launch = Launch(
            folder=None, weights_folder=None, device=torch.device(device).type,
            dtype=str(dtype).removeprefix("torch."), quantization=quantization, world=gpus,
            shape=shape,
        )  # fmt: skip
        transformer, _ = load_parallel(launch)
    else:
        transformer = random_transformer(config, torch.device(device), dtype, quantization)
        # The fused CUDA step or PyTorch's CPU step, never the C one: an int4 shape on the CPU
        # has always measured PyTorch's step here, not the one ChatModel.load picks.
        transformer.decode_step = choose_decode_step(transformer, native=False)
        transformer.logits = choose_logits(transformer)
    # No tokenizer: the benchmark works on token ids.
    llama3 = BUILTIN_FORMATS["llama-3"]
    return ChatModel(
        None, config, transformer, None, llama3, frozenset(), quantization, threads_used
    )


def copy_bandwidth(device: str = "cuda", size: float = 2 * 1024**3, repeats: int = 20) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy."""
    source = torch.empty(int(size) // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    seconds = _timed(lambda: [target.copy_(source) for _ in range(repeats)], device)
    return 2 * source.nbytes * repeats / seconds


def measure(
    model: ChatModel,
    name: str,
    contexts: tuple[int, ...] = (256, 4096),
    prefills: tuple[int, ...] = (512, 4000),
    decode_steps: int = 128,
    history: int = 4000,
    new_turn: int = 64,
    cuda_graphs: bool | None = None,
) -> BenchResult:
    device = model.device
    ctx = max(*contexts, *prefills, history + new_turn) + decode_steps + 1
    session = model.session(ctx=min(ctx, model.context_length), cuda_graphs=cuda_graphs)
    result = BenchResult(
        name,
        str(device),
        str(model.dtype).removeprefix("torch."),
        model.quantization,
        weight_bytes(model.transformer),
        model.kv_bytes_per_token,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = torch.randint(
        0, model.config.vocab_size, (ctx,), generator=torch.Generator().manual_seed(1)
    ).tolist()

    for length in prefills:
        # One untimed run first: the first prompt of a length compiles its kernels and picks
        # cuBLAS's algorithms, and on a GPU that idled the clocks are still rising (the
        # 512-token figure moved by ±30% between calls without it).
        session.reset()
        _timed(lambda n=length: session._forward(tokens[:n]), device)
        times = []
        for _ in range(3):
            session.reset()
            times.append(_timed(lambda n=length: session._forward(tokens[:n]), device))
        result.prefill_tokens_per_s[length] = length / statistics.median(times)

    for context in contexts:
        session.reset()
        session._forward(tokens[:context])
        for step in range(8):  # warm up (and capture the graph for this span)
            session._forward([tokens[context + step]])
        del session.cached_ids[context:]
        seconds = _timed(lambda c=context: _decode(session, tokens, c, decode_steps), device)
        result.decode_tokens_per_s[context] = decode_steps / seconds

    # Time to first token of a new turn after a long conversation: with the cache, and without.
    result.history_tokens = history
    conversation = tokens[: history + new_turn]
    reused, full = [], []
    for _ in range(3):
        session.reset()
        session._forward(tokens[:history])
        reused.append(_first_token_ms(session, conversation))
        session.reset()
        full.append(_first_token_ms(session, conversation))
    result.ttft_new_turn_reused_ms = statistics.median(reused)
    result.ttft_new_turn_full_ms = statistics.median(full)
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated()
    leader = model.transformer.leader
    if leader is not None:
        result.gpus = model.gpus
        config = model.config
        seconds = leader.all_reduce_seconds(config.hidden_size, model.dtype, device)
        result.all_reduce_ms_per_token = seconds * (2 * config.n_layers + 1) * 1000
    return result


def _decode(session: ChatSession, tokens: list[int], context: int, steps: int) -> None:
    """Greedy steps as the chat does them: sample on the device, bring the id to the host."""
    logits = None
    for step in range(steps):
        token = tokens[context + step] if logits is None else int(logits[0, -1].argmax())
        logits = session._forward([token])
    del session.cached_ids[context:]


def _first_token_ms(session: ChatSession, conversation: list[int]) -> float:
    stats = GenerationStats()
    if session.model.device.type == "cuda":
        torch.cuda.synchronize()  # the history's prefill must not count
    started = time.perf_counter()
    tokens = session.generate(conversation, GREEDY, 1, threading.Event(), stats)
    next(tokens)
    tokens.close()
    return (time.perf_counter() - started) * 1000


def _timed(work: Callable[[], object], device: torch.device | str) -> float:
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        work()
    synchronize()
    return time.perf_counter() - started
