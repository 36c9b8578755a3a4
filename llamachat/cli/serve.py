"""`llamachat serve`: the OpenAI-compatible HTTP server over local chats (llamachat/server)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from dataclasses import replace
from typing import Annotated

import typer

from ..backends.base import Chat, ChatSpec
from ..backends.local import ContextSizeError, KvMemoryError, ShapeError
from ..backends.process import EngineProcess
from ..chat_options import chosen_model, resolve
from ..home import Home
from ..models.store import ModelStore
from ..serving import LoadedModel, forget, loopback_url, record
from ..settings import load
from .background import log_path, start_in_background
from .console import CliError
from .generation import open_history
from .options import GenerationOptions, checked_device, checked_dtype, checked_quantize

GRACEFUL_SHUTDOWN_S = 10  # in-flight replies get this long after Ctrl+C/SIGTERM, then stop


def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", "-m", help="A model to serve (repeatable). [default: the default model]"
        ),
    ] = None,
    shape: Annotated[
        str | None,
        typer.Option(
            "--shape",
            help="Serve random weights of a model shape instead (1b, 7b, 8b, 70b), for"
            " benchmarks, as model id SHAPE; its replies run to their token limit.",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="With --shape: the tokenizer and chat format of this installed model or model"
            " folder. [default: the default model's]",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLAMACHAT_API_KEY",
            show_envvar=True,
            help="Clients must send Authorization: Bearer KEY.",
        ),
    ] = None,
    no_api_key_on_network: Annotated[
        bool,
        typer.Option(
            "--no-api-key-on-network",
            help="Serve a non-loopback --host without an API key (open to anyone who reaches it).",
        ),
    ] = False,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            min=1,
            help="Replies written at once, per model. [default: 8; 1 with --gpus]",
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", min=0, help="Requests that may wait beyond those; more get 503."
        ),
    ] = 64,
    kv_memory: Annotated[
        float | None,
        typer.Option(
            "--kv-memory",
            min=0.0,
            help="GiB of KV cache per model: conversations beyond --max-batch stay cached for"
            " their clients' next turns. [default: just enough for --max-batch]",
        ),
    ] = None,
    step_tokens: Annotated[
        int | None,
        typer.Option(
            "--step-tokens",
            min=16,
            help="Rows a step takes at most: the replies' next tokens and prompt tokens"
            " together. On a GPU, 512 or fewer run each step as a CUDA graph, prompts read"
            " beside the replies; more run the steps that carry prompts op by op. On a CPU,"
            " the prompt tokens read in one pass. [default: 384 on a GPU, 512 on a CPU]",
        ),
    ] = None,
    ctx: Annotated[int | None, typer.Option(min=16, help="Context window in tokens.")] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto, cpu, cuda or cuda:N.",
            callback=checked_device,
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float32, bfloat16 or float16.",
            callback=checked_dtype,
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize", help="auto, none, int8, int4, fp8, f16.", callback=checked_quantize
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads.")] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Split each model over this many GPUs (tensor parallel); one reply at a time.",
        ),
    ] = None,
    background: Annotated[
        bool,
        typer.Option(
            "--background",
            help="Start the server as a process of its own and return once it serves; one-shots,"
            " -c and the chat app on this machine then use its models (`llamachat ps` lists"
            " them, `llamachat stop` stops it).",
        ),
    ] = False,
    detached: Annotated[bool, typer.Option("--detached", hidden=True)] = False,
) -> int:
    """Serve models over OpenAI's API (chat completions, completions, models) on HOST:PORT."""
    if shape is not None and model:
        raise CliError("give either --model or --shape, not both", exit_code=2)
    if tokenizer is not None and shape is None:
        raise CliError("--tokenizer goes with --shape (a model has its own)", exit_code=2)
    if not api_key and not no_api_key_on_network and not _is_loopback(host):
        raise CliError(
            f"--host {host} is reachable from other machines: give --api-key KEY (or"
            " LLAMACHAT_API_KEY), or pass --no-api-key-on-network to serve it open",
            exit_code=2,
        )
    if gpus is not None and gpus > 1:
        if max_batch is not None and max_batch > 1:
            raise CliError(
                "a model split with --gpus writes one reply at a time for now: leave out "
                "--max-batch (or give 1)",
                exit_code=2,
            )
        max_batch = 1
    max_batch = max_batch or 8
    home = Home.current()
    if background:
        return start_in_background(home, _flags(locals()), api_key)
    import uvicorn

    from ..server import create_app

    given = GenerationOptions(
        ctx=ctx, device=device, dtype=dtype, quantize=quantize, threads=threads, gpus=gpus
    )
    options = resolve(given, load(home.config_file), open_history())
    store = ModelStore(home.models)
    if shape is not None:
        names = [shape]
        # A name or a folder; by default the model `-m` would pick.
        tokenizer = tokenizer or chosen_model(options, store)
    else:
        names = [chosen_model(replace(options, model=m), store) for m in model or [None]]
    sock = _listening(host, port)  # before loading: a port in use fails at once
    specs = []
    for name in dict.fromkeys(names):
        spec = replace(options.spec(name), concurrency=max_batch)
        if kv_memory is not None:
            spec = replace(spec, kv_memory=int(kv_memory * 2**30))
        if step_tokens is not None:
            spec = replace(spec, step_tokens=step_tokens)
        if shape is not None:
            spec = replace(spec, shape=shape, tokenizer=tokenizer)
        specs.append(spec)
    engine = _open(store, specs)
    chats: dict[str, Chat] = dict(engine.chats)
    app = create_app(chats, api_key=api_key, max_queue=max_queue, max_batch=max_batch)
    config = uvicorn.Config(
        app,
        log_config=_log_config(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    server = uvicorn.Server(config)
    lost: list[str] = []  # why the engine process stopped under the server, if it did

    def engine_lost(why: str) -> None:
        lost.append(why)
        server.should_exit = True  # uvicorn looks at it between its ticks

    engine.when_lost(engine_lost)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    loaded = [
        LoadedModel(name, info.device, info.dtype, info.weight_format, info.context_size)
        for name, info in ((name, chat.info) for name, chat in chats.items())
    ]
    log = log_path(home, os.getpid()) if detached else None

    # uvicorn handles SIGTERM while it runs, and raises it again once it has stopped: then this
    # handler takes it, and serve returns 0. One that comes before uvicorn's handler is in place
    # (once the line below is printed, a client may send it) asks uvicorn to stop as soon as it
    # has started.
    def terminated(*_) -> None:
        server.should_exit = True

    previous = signal.signal(signal.SIGTERM, terminated)
    recorded = None
    try:
        # Recorded before it is said: a client that read the line finds the server.
        recorded = record(home.runtime, loopback_url(host, bound), loaded, bool(api_key), log)
        print(
            f"llamachat: serving {', '.join(chats)} at http://{shown}:{bound}/v1"
            f"{' (API key required)' if api_key else ''}",
            file=sys.stderr,
            flush=True,
        )
        server.run(sockets=[sock])  # uvicorn re-raises the signal it stopped for, after
    finally:
        if recorded is not None:
            forget(recorded)  # no client may pick a server that no longer answers
        signal.signal(signal.SIGTERM, previous)
        engine.close()
    if lost:
        raise CliError(f"{lost[-1]}; the server stopped with it")
    return 0


def _flags(given: dict) -> list[str]:
    """serve's command line again, from its parameters, for the background process (the key
    goes in its environment: a command line is visible to every user of the machine)."""
    flags: list[str] = []
    for name in given.get("model") or []:
        flags += ["--model", name]
    named = ("shape", "tokenizer", "host", "port", "max_batch", "max_queue", "kv_memory")
    for option in (*named, "step_tokens"):
        if given[option] is not None:
            flags += [f"--{option.replace('_', '-')}", str(given[option])]
    for option in ("ctx", "device", "dtype", "quantize", "threads", "gpus"):
        if given[option] is not None:
            flags += [f"--{option}", str(given[option])]
    if given["no_api_key_on_network"]:
        flags.append("--no-api-key-on-network")
    return flags


def _open(store: ModelStore, specs: list[ChatSpec]) -> EngineProcess:
    """The models of `specs`, opened in an engine process of their own."""
    for spec in specs:
        what = f"a {spec.shape} model with random weights" if spec.shape else spec.model
        print(f"llamachat: loading {what}…", file=sys.stderr, flush=True)
    try:
        return EngineProcess(store.root, specs)
    except ContextSizeError as error:
        raise CliError(
            f"--ctx {error.requested} is larger than the model's context of {error.limit}", 2
        ) from None
    except (ShapeError, KvMemoryError) as error:
        raise CliError(str(error), 2) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _listening(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    os.set_inheritable(sock.fileno(), False)
    return sock


def _log_config() -> dict:
    """uvicorn's logging, every line on stderr (stdout is for answers; the access log shows
    the request line only, never a header, so the key is not logged)."""
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "handlers": {**LOGGING_CONFIG["handlers"]}}
    config["handlers"]["access"] = {**config["handlers"]["access"], "stream": "ext://sys.stderr"}
    return config
