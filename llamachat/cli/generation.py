"""What the one-shot answer and the chat share: choosing the model, loading it, the sampling
parameters from config and flags, and the stats line."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..home import Home
from ..models.store import InstalledModel, ModelStore
from ..settings import Settings, load
from .console import CliError, stderr
from .options import GenerationOptions

if TYPE_CHECKING:
    from ..engine import ChatModel, ChatSession, ReplyStats, SamplingParams


@dataclass(frozen=True)
class Conversation:
    """A loaded model and a session on it, with everything the flags and config decided."""

    installed: InstalledModel
    model: ChatModel
    session: ChatSession
    sampling: SamplingParams
    system: str | None
    max_tokens: int | None

    def messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        """The turns, after the system prompt when there is one."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns


def start(options: GenerationOptions) -> Conversation:
    home = Home.current()
    settings = load(home.config_file)
    installed = installed_model(ModelStore(home.models), settings, options.model)
    sampling = sampling_params(options, settings)
    model = load_model(installed, options, settings)
    session = model.session(context_size(options, settings, model))
    return Conversation(
        installed=installed,
        model=model,
        session=session,
        sampling=sampling,
        system=_pick(options.system, settings.system),
        max_tokens=_pick(options.max_tokens, settings.max_tokens),
    )


def installed_model(store: ModelStore, settings: Settings, requested: str | None) -> InstalledModel:
    name = requested or settings.default_model
    if name:
        return store.get(name)
    latest = store.latest()
    if latest is None:
        raise CliError("no model is installed: run `llamachat pull smollm2` to get the default one")
    return latest


def sampling_params(options: GenerationOptions, settings: Settings) -> SamplingParams:
    from ..engine import SamplingParams

    chosen = {
        key: value
        for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
        if (value := _pick(getattr(options, key), getattr(settings, key))) is not None
    }
    try:
        return SamplingParams(**chosen)
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None


def load_model(model: InstalledModel, options: GenerationOptions, settings: Settings) -> ChatModel:
    from ..engine import ChatModel

    device = _pick(options.device, settings.device) or "auto"
    dtype = _pick(options.dtype, settings.dtype)
    status = stderr.status(f"loading {model.name}…") if stderr.is_terminal else nullcontext()
    with status:
        return ChatModel.load(
            model.path, device=device, dtype=dtype, chat_format=options.chat_format
        )


def context_size(options: GenerationOptions, settings: Settings, model: ChatModel) -> int | None:
    ctx = _pick(options.ctx, settings.ctx)
    if ctx is not None and ctx > model.context_length:
        raise CliError(
            f"--ctx {ctx} is larger than the model's context of {model.context_length}", 2
        )
    return ctx


def print_stats(stats: ReplyStats) -> None:
    """Like `ollama run --verbose`: on stderr, after the answer."""
    lines = [
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
