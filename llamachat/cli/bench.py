"""`llamachat bench`: how fast the engine runs a model here."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from ..chat_options import weight_format_for
from ..home import Home
from ..models.store import ModelStore
from ..settings import load
from .console import CliError, stderr, stdout
from .options import checked_quantize


def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="An installed model.")] = None,
    shape: Annotated[
        str | None,
        typer.Option(
            "--shape", help="A model shape with random weights instead: 1b, 7b, 8b or 70b."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="Weight format: auto, none, int8, int4, fp8 (GPU), f16 (CPU)."
            " [default: the config's, else the model's, else auto]",
            callback=checked_quantize,
        ),
    ] = None,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs", help="Replay the decode step as CUDA graphs."
        ),
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads. [default: the config's, else the idle cores]"),
    ] = None,
    gpus: Annotated[
        int,
        typer.Option(
            min=1, help="Split the model over this many GPUs (tensor parallel). [default: 1]"
        ),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure prefill, decode and time to first token (with and without the KV cache)."""
    from ..engine import ChatModel
    from ..engine.bench import SHAPES, copy_bandwidth, measure, random_model
    from ..engine.loading import resolve_device, resolve_dtype
    from ..engine.quantize import resolve_quantization

    if (model is None) == (shape is None):
        raise CliError("give either --model NAME or --shape SHAPE", exit_code=2)
    home = Home.current()
    settings = load(home.config_file)
    target = resolve_device(device)
    threads = threads if threads is not None else settings.threads
    if shape is not None:
        if shape not in SHAPES:
            raise CliError(f"unknown shape {shape!r}: use {', '.join(SHAPES)}", exit_code=2)
        torch_dtype = resolve_dtype(dtype, target)
        choice = quantize or settings.quantize or "auto"
        quantization = resolve_quantization(choice, target, torch_dtype)
        stderr.print(f"making a {shape} model with random weights on {target}…", markup=False)
        chat_model = random_model(shape, str(target), torch_dtype, quantization, threads, gpus)
        name = shape
    else:
        installed = ModelStore(home.models).get(model)
        installed.check_sizes()
        choice = weight_format_for(quantize or settings.quantize, installed.manifest.quantization)
        chat_model = ChatModel.load(
            installed.path,
            str(target),
            dtype,
            quantization=choice,
            threads=threads,
            source_bits=installed.manifest.source_bits,
            gpus=gpus,
        )
        name = installed.name
    gpu = target.type == "cuda"
    limit = chat_model.context_length
    contexts = tuple(c for c in ((256, 4096, 32768) if gpu else (256, 2048)) if c + 200 <= limit)
    prefills = tuple(p for p in ((512, 4000) if gpu else (128, 512)) if p + 200 <= limit)
    history = min(4000 if gpu else 1000, limit - 200)
    stderr.print("measuring…", markup=False)
    result = measure(
        chat_model, name, contexts=contexts, prefills=prefills, history=history,
        decode_steps=128 if gpu else 32, cuda_graphs=cuda_graphs and gpu,
    )  # fmt: skip
    bandwidth = copy_bandwidth(str(target), size=(2 if gpu else 0.5) * 1024**3)
    if as_json:
        data = asdict(result) | {"copy_bandwidth_bytes_per_s": bandwidth}
        data["bandwidth_share"] = {c: result.bandwidth_share(c, bandwidth) for c in contexts}
        stdout.print_json(json.dumps(data))
        return
    weights = f", {result.quantization}" if result.quantization else ""
    on_cpu = f", {chat_model.threads} threads" if chat_model.threads else ""
    split = f" over {gpus} {'GPUs' if gpu else 'processes'}" if gpus > 1 else ""
    title = f"{name} on {result.device}{split} ({result.dtype}{weights}{on_cpu})"
    table = Table(title=title, box=None, pad_edge=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for length, rate in result.prefill_tokens_per_s.items():
        table.add_row(f"prefill {length} tokens", f"{rate:,.0f} tok/s")
    for context, rate in result.decode_tokens_per_s.items():
        share = 100 * result.bandwidth_share(context, bandwidth)
        table.add_row(
            f"decode at {context} tokens of context",
            f"{rate:.1f} tok/s ({share:.0f}% of bandwidth)",
        )
    turn = f"TTFT, 64-token turn after {result.history_tokens}"
    table.add_row(f"{turn}, cache reused", f"{result.ttft_new_turn_reused_ms:.1f} ms")
    table.add_row(f"{turn}, all prefilled", f"{result.ttft_new_turn_full_ms:.1f} ms")
    if result.all_reduce_ms_per_token is not None:
        table.add_row("all-reduces a token", f"{result.all_reduce_ms_per_token:.2f} ms")
    each = ", each rank's" if gpus > 1 else ""
    table.add_row(f"weights{each}", f"{result.weight_bytes / 1e9:.2f} GB")
    table.add_row(f"KV cache per token{each}", f"{result.kv_bytes_per_token / 1024:.0f} KiB")
    table.add_row("copy bandwidth (read + write)", f"{bandwidth / 1e9:,.0f} GB/s")
    if result.peak_memory_bytes:
        table.add_row("peak GPU memory", f"{result.peak_memory_bytes / 1e9:.1f} GB")
    stdout.print(table)
