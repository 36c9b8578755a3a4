"""Options shared by every command that generates text (the one-shot answer and the chat).

They are declared once here; `generation_options` adds them to a command's signature and hands
the command one GenerationOptions instead of fourteen parameters.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any

import typer

from ..settings import QUANTIZE_CHOICES

PANEL = "Generation"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPE_PATTERN = re.compile(r"float32|fp32|bfloat16|bf16|float16|fp16")
QUANTIZE_PATTERN = re.compile("|".join(QUANTIZE_CHOICES))
QUANTIZE_NAMES = ", ".join(QUANTIZE_CHOICES)


def checked_quantize(value: str | None) -> str | None:
    """The --quantize callback, shared with `pull` and `bench`."""
    return _checked(value, QUANTIZE_PATTERN, QUANTIZE_NAMES)


def checked_device(value: str | None) -> str | None:
    """The --device callback, shared with `serve`."""
    return _checked(value, DEVICE_PATTERN, "auto, cpu, cuda or cuda:N")


def checked_dtype(value: str | None) -> str | None:
    """The --dtype callback, shared with `serve`."""
    return _checked(value, DTYPE_PATTERN, "float32, bfloat16 or float16")


def _checked(value: str | None, pattern: re.Pattern[str], choices: str) -> str | None:
    if value is not None and not pattern.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of {choices}")
    return value


@dataclass(frozen=True)
class GenerationOptions:
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Installed model (default: config's default_model, else the latest pulled).",
            rich_help_panel=PANEL,
        ),
    ] = None
    system: Annotated[
        str | None, typer.Option("--system", "-s", help="System prompt.", rich_help_panel=PANEL)
    ] = None
    temperature: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Sampling temperature; 0 is greedy. [default: the model's, else 0.8]",
            rich_help_panel=PANEL,
        ),
    ] = None
    top_p: Annotated[
        float | None,
        typer.Option(
            "--top-p",
            min=0.0,
            max=1.0,
            help="Nucleus sampling mass. [default: the model's, else 0.95]",
            rich_help_panel=PANEL,
        ),
    ] = None
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=0,
            help="Sample among the k most likely tokens; 0 = all. [default: the model's, else 40]",
            rich_help_panel=PANEL,
        ),
    ] = None
    min_p: Annotated[
        float | None,
        typer.Option(
            "--min-p",
            min=0.0,
            max=1.0,
            help="Drop tokens below min-p × the best one's probability."
            " [default: the model's, else 0.05]",
            rich_help_panel=PANEL,
        ),
    ] = None
    repeat_penalty: Annotated[
        float | None,
        typer.Option(
            "--repeat-penalty",
            min=0.0,
            help="Penalty on the last 64 tokens; 1 = off. [default: the model's, else 1.1]",
            rich_help_panel=PANEL,
        ),
    ] = None
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=2**64 - 1,  # what a torch.Generator takes
            help="Random seed: same seed, input, device and --threads → same answer.",
            rich_help_panel=PANEL,
        ),
    ] = None
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens",
            min=1,
            help="Most tokens in the reply. [default: the model's, else 2048]",
            rich_help_panel=PANEL,
        ),
    ] = None
    ctx: Annotated[
        int | None,
        typer.Option(
            min=16,
            help="Context window in tokens. [default: the model's, at most 8192]",
            rich_help_panel=PANEL,
        ),
    ] = None
    device: Annotated[
        str | None,
        typer.Option(
            help="auto, cpu, cuda or cuda:N. [default: auto]",
            callback=checked_device,
            rich_help_panel=PANEL,
        ),
    ] = None
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float32, bfloat16 or float16. [default: bf16 on GPU, fp32 on CPU]",
            callback=checked_dtype,
            rich_help_panel=PANEL,
        ),
    ] = None
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="Weight format: auto, none, int8, int4, fp8 (GPU), f16 (CPU). "
            "[default: auto: int4 for a 4-bit GGUF's model on a CPU, else f16 there; as stored "
            "on a GPU]",
            callback=checked_quantize,
            rich_help_panel=PANEL,
        ),
    ] = None
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for the model (llama.cpp's -t). [default: the physical cores"
            " that other processes leave idle, measured at load and before each reply]",
            rich_help_panel=PANEL,
        ),
    ] = None
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            min=1,
            help="Split the model over this many GPUs of this machine (tensor parallel, a "
            "process each). [default: 1]",
            rich_help_panel=PANEL,
        ),
    ] = None
    chat_format: Annotated[
        str | None,
        typer.Option(
            "--chat-format",
            help="Prompt format: model (its own template), llama-2, llama-3, chatml, alpaca,"
            " vicuna.",
            rich_help_panel=PANEL,
        ),
    ] = None
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="A system-prompt preset (helpful, concise, coder, 中英翻译, or your own).",
            rich_help_panel=PANEL,
        ),
    ] = None
    continue_: Annotated[
        bool,
        typer.Option(
            "--continue",
            "-c",
            help="Continue the most recent conversation instead of starting one.",
            rich_help_panel=PANEL,
        ),
    ] = False
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Load the model in this process even when a llamachat server on this machine"
            " has it loaded.",
            rich_help_panel=PANEL,
        ),
    ] = False
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="After the answer, print token counts and speed on stderr.",
            rich_help_panel=PANEL,
        ),
    ] = False


def generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` (whose last parameter is `options: GenerationOptions`) the options as
    command-line parameters, collected back into one GenerationOptions when it runs."""
    names = [field.name for field in fields(GenerationOptions)]
    hints = inspect.get_annotations(GenerationOptions, eval_str=True)
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "options"]
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=getattr(GenerationOptions, name),
            annotation=hints[name],
        )
        for name in names
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        options = GenerationOptions(**{name: kwargs.pop(name) for name in names})
        return command(*args, options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped one
    return wrapper


def given_options(options: GenerationOptions) -> list[str]:
    """The flags of `options` that were given (differ from their defaults), as typed."""
    return ["--" + name.rstrip("_").replace("_", "-") for name in _given(options)]


def with_earlier(
    options: GenerationOptions, earlier: GenerationOptions | None
) -> GenerationOptions:
    """A command's options over those given before it (`llamachat -m NAME ask …`)."""
    return options if earlier is None else replace(earlier, **_given(options))


def _given(options: GenerationOptions) -> dict[str, Any]:
    return {
        field.name: getattr(options, field.name)
        for field in fields(GenerationOptions)
        if getattr(options, field.name) != field.default
    }
