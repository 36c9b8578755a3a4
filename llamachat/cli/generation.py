"""What the one-shot answer and the line chat share: choosing the model and the conversation,
loading the model, the sampling parameters from config and flags, and the stats line."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..history.presets import all_presets, preset_prompt
from ..history.store import HistoryStore
from ..home import Home
from ..models.errors import StoreError
from ..models.reply_defaults import ReplyDefaults, reply_defaults
from ..models.store import InstalledModel, ModelStore
from ..settings import Settings, load
from .console import CliError, stderr
from .options import GenerationOptions

if TYPE_CHECKING:
    from ..engine import ChatModel, ChatSession, SamplingParams
    from ..engine import GenerationStats as ReplyStats


@dataclass(frozen=True)
class Setup:
    """A loaded model and a session on it, with everything the flags and config decided, and
    the conversation to continue (with --continue) or None for a new one."""

    installed: InstalledModel
    model: ChatModel
    session: ChatSession
    sampling: SamplingParams
    max_tokens: int
    system: str | None
    continued: int | None


def start(options: GenerationOptions, history: HistoryStore) -> Setup:
    home = Home.current()
    settings = load(home.config_file)
    store = ModelStore(home.models)
    continued = None
    requested = options.model
    system = _system_prompt(options, history)
    if options.continue_:
        latest = history.latest()
        if latest is None:
            raise CliError("there is no conversation to continue yet", exit_code=2)
        continued = latest.id
        if requested is None and latest.model and _is_installed(store, latest.model):
            requested = latest.model
    elif system is None:
        system = settings.system
    installed = store.choose(requested, settings.default_model)
    defaults = reply_defaults(installed.path)
    sampling = sampling_params(options, settings, defaults)
    model = load_model(installed, options, settings)
    session = model.session(context_size(options, settings, model))
    return Setup(
        installed=installed,
        model=model,
        session=session,
        sampling=sampling,
        max_tokens=_pick(options.max_tokens, settings.max_tokens) or defaults.max_tokens,
        system=system,
        continued=continued,
    )


def open_history() -> HistoryStore:
    return HistoryStore(Home.current().history_db)


def _system_prompt(options: GenerationOptions, history: HistoryStore) -> str | None:
    """--system, else the prompt of --preset; None when neither is given."""
    if options.system is not None:
        return options.system
    if options.preset is None:
        return None
    try:
        return preset_prompt(history, options.preset)
    except KeyError:
        names = ", ".join(all_presets(history))
        raise CliError(
            f"no preset named {options.preset!r} (presets: {names})", exit_code=2
        ) from None


def _is_installed(store: ModelStore, name: str) -> bool:
    try:
        store.get(name)
    except StoreError:
        return False
    return True


def sampling_choices(options: GenerationOptions, settings: Settings) -> dict[str, Any]:
    """The sampling fields set by a flag or, failing that, by the config file."""
    return {
        key: value
        for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
        if (value := _pick(getattr(options, key), getattr(settings, key))) is not None
    }


def sampling_params(
    options: GenerationOptions, settings: Settings, defaults: ReplyDefaults
) -> SamplingParams:
    """Flags over the config over the model's recommendation over llamachat's defaults."""
    from ..engine import SamplingParams

    try:
        return SamplingParams(**defaults.sampling_with(sampling_choices(options, settings)))
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None


def app_options(options: GenerationOptions, theme: str | None) -> Any:
    """The chat app's options (a tui.ChatAppOptions), from the flags over the config file."""
    from ..tui import ChatAppOptions

    home = Home.current()
    settings = load(home.config_file)
    sampling_params(options, settings, ReplyDefaults())  # refuse bad values before the app starts
    system = _system_prompt(options, HistoryStore(home.history_db))
    return ChatAppOptions(
        model=options.model,
        device=_pick(options.device, settings.device) or "auto",
        dtype=_pick(options.dtype, settings.dtype),
        quantize=_pick(options.quantize, settings.quantize),
        threads=_pick(options.threads, settings.threads),
        ctx=_pick(options.ctx, settings.ctx),
        chat_format=options.chat_format,
        sampling=sampling_choices(options, settings),
        max_tokens=_pick(options.max_tokens, settings.max_tokens),
        system=system if system is not None else settings.system,
        continue_latest=options.continue_,
        theme=theme,
    )


def load_model(model: InstalledModel, options: GenerationOptions, settings: Settings) -> ChatModel:
    from ..engine import ChatModel

    model.check_sizes()  # a truncated or missing file: one line naming it, before torch reads it
    device = _pick(options.device, settings.device) or "auto"
    dtype = _pick(options.dtype, settings.dtype)
    quantization = quantization_for(model, options.quantize, settings)
    status = stderr.status(f"loading {model.name}…") if stderr.is_terminal else nullcontext()
    with status:
        return ChatModel.load(
            model.path,
            device=device,
            dtype=dtype,
            chat_format=options.chat_format,
            quantization=quantization,
            threads=_pick(options.threads, settings.threads),
        )


def quantization_for(model: InstalledModel, flag: str | None, settings: Settings) -> str:
    """--quantize, else the config's quantize, else the format `pull --quantize` recorded for
    the model, else auto."""
    return _pick(flag, settings.quantize) or model.manifest.quantization or "auto"


def dtype_name(model: ChatModel) -> str:
    return str(model.dtype).removeprefix("torch.")


def context_size(options: GenerationOptions, settings: Settings, model: ChatModel) -> int | None:
    ctx = _pick(options.ctx, settings.ctx)
    if ctx is not None and ctx > model.context_length:
        raise CliError(
            f"--ctx {ctx} is larger than the model's context of {model.context_length}", 2
        )
    return ctx


def cut_notice(stats: ReplyStats, setup: Setup, options: GenerationOptions) -> str | None:
    """Why a reply ended before the model finished it, for stderr; None when it finished, was
    stopped by the user, or stopped at a --max-tokens given on this very command line."""
    if stats.finish_reason == "context":
        return "the answer was cut off: the context window is full (raise --ctx)"
    if stats.finish_reason == "length" and options.max_tokens is None:
        return (
            f"the answer was cut off at its limit of {setup.max_tokens} tokens (raise --max-tokens)"
        )
    return None


def print_stats(stats: ReplyStats, model: ChatModel) -> None:
    """Like `ollama run --verbose`: on stderr, after the answer."""
    lines = [
        ("device", f"{model.device} {dtype_name(model)}"),
        *([("threads", f"{model.threads}")] if model.threads else []),
        ("weight format", model.quantization or "none"),
        ("prompt tokens", f"{stats.prompt_tokens}"),
        ("reused from cache", f"{stats.reused_tokens}"),
        ("prefilled", f"{stats.prefilled_tokens}"),
        ("time to first token", f"{stats.time_to_first_token_s * 1000:.0f} ms"),
        ("generated tokens", f"{stats.generated_tokens}"),
        ("decode rate", f"{stats.decode_tokens_per_s:.1f} tokens/s"),
        ("finish", stats.finish_reason or "-"),
    ]
    for label, value in lines:
        stderr.print(f"{label + ':':22}{value}", markup=False)


def _pick(flag, configured):
    return flag if flag is not None else configured
