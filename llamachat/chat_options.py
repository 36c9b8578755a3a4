"""What a chat runs with, decided in one place: flags over the config file over the model's own
record over defaults, for the one-shot answer, the line chat and the app alike.

`resolve` takes the flags and the config once, into ChatOptions. The model's layer (the weight
format its pull recorded, the sampling its generation_config.json recommends) is filled in when
the model is opened (backends/local.py, through `weight_format_for` and its reply defaults);
what is left after that is the backend's default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from .backends.base import ChatSpec, Sampling
from .history.conversation_settings import ConversationSettings
from .history.presets import all_presets, preset_prompt
from .history.store import HistoryStore
from .models.errors import StoreError
from .models.store import ModelStore
from .remotes import Remote, split_model
from .settings import Settings

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
PLACEMENT = ("device", "dtype", "quantize", "threads", "gpus", "chat_format")
OWN_LIMITS = ("max_tokens", "ctx")  # besides sampling, what a conversation may set for itself


class OptionsError(Exception):
    """A flag or config value that cannot be used: bad usage, exit code 2."""

    exit_code = 2


class GivenOptions(Protocol):
    """The generation flags as the command line parsed them (cli.options.GenerationOptions);
    None where a flag was not given."""

    model: str | None
    system: str | None
    preset: str | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repeat_penalty: float | None
    seed: int | None
    max_tokens: int | None
    ctx: int | None
    device: str | None
    dtype: str | None
    quantize: str | None
    threads: int | None
    gpus: int | None
    chat_format: str | None
    continue_: bool
    local: bool


@dataclass(frozen=True)
class ChatOptions:
    """The flags over the config file. None: neither decided (the model's record or the
    backend's default will)."""

    model: str | None = None  # -m
    default_model: str | None = None  # the config's; else the latest installed
    device: str = "auto"
    dtype: str | None = None
    quantize: str | None = None  # None: the format the model's pull recorded, else auto
    threads: int | None = None  # CPU threads; None: the engine's default
    gpus: int = 1  # GPUs the model is split over (tensor parallel)
    ctx: int | None = None
    chat_format: str | None = None
    sampling: Sampling = Sampling()
    max_tokens: int | None = None
    system: str | None = None  # --system, or the prompt of --preset
    default_system: str | None = None  # the config's, for a new conversation without one
    continue_latest: bool = False
    theme: str | None = None  # the chat app's
    # The model runs in this process, never on a llamachat server here that has it loaded:
    # --local, or a flag that places the model (device, dtype, weights, threads, format),
    # which a server started with its own cannot honour.
    in_process: bool = False
    # The fields that flags set (sampling's by name, max_tokens, ctx): a conversation's own
    # settings go over the config's, never over these.
    flagged: frozenset[str] = frozenset()

    def for_conversation(self, own: ConversationSettings) -> ChatOptions:
        """These options with a conversation's own settings over the config's and the model's;
        the flags still win. Raises OptionsError for a value out of range."""
        chosen = {k: v for k, v in own.chosen().items() if k not in self.flagged}
        sampled = {k: v for k, v in chosen.items() if k in SAMPLING_FIELDS}
        try:
            sampling = replace(self.sampling, **sampled)
        except ValueError as error:
            raise OptionsError(f"the conversation's settings: {error}") from None
        return replace(
            self,
            sampling=sampling,
            max_tokens=chosen.get("max_tokens", self.max_tokens),
            ctx=chosen.get("ctx", self.ctx),
        )

    @property
    def new_system(self) -> str | None:
        """The system prompt a new conversation starts with."""
        return self.system if self.system is not None else self.default_system

    def spec(self, model: str) -> ChatSpec:
        """What to open `model` with."""
        return ChatSpec(
            model=model,
            ctx=self.ctx,
            weight_format=self.quantize,
            sampling=self.sampling,
            max_tokens=self.max_tokens,
            device=self.device,
            dtype=self.dtype,
            threads=self.threads,
            gpus=self.gpus,
            chat_format=self.chat_format,
        )


def resolve(
    given: GivenOptions, settings: Settings, history: HistoryStore, theme: str | None = None
) -> ChatOptions:
    """The flags over the config. Raises OptionsError for an unknown preset or a sampling value
    out of range, before any model loads."""
    sampling = {
        key: value
        for key in SAMPLING_FIELDS
        if (value := _pick(getattr(given, key), getattr(settings, key))) is not None
    }
    try:
        chosen = Sampling(**sampling)
    except ValueError as error:
        raise OptionsError(str(error)) from None
    return ChatOptions(
        model=given.model,
        default_model=settings.default_model,
        device=_pick(given.device, settings.device) or "auto",
        dtype=_pick(given.dtype, settings.dtype),
        quantize=_pick(given.quantize, settings.quantize),
        threads=_pick(given.threads, settings.threads),
        gpus=given.gpus or 1,
        ctx=_pick(given.ctx, settings.ctx),
        chat_format=given.chat_format,
        sampling=chosen,
        max_tokens=_pick(given.max_tokens, settings.max_tokens),
        system=_system_prompt(given, history),
        default_system=settings.system,
        continue_latest=given.continue_,
        theme=theme,
        in_process=given.local or any(getattr(given, flag) is not None for flag in PLACEMENT),
        flagged=frozenset(
            key for key in (*SAMPLING_FIELDS, *OWN_LIMITS) if getattr(given, key) is not None
        ),
    )


def chosen_model(
    options: ChatOptions,
    store: ModelStore,
    continued: str | None = None,
    remotes: dict[str, Remote] | None = None,
) -> str:
    """-m, else the model of the conversation being continued (while it is installed or on a
    remote), else the config's default_model, else the latest installed. A remote's model
    (NAME/MODEL) is taken as it is: its server says whether it has it. Raises StoreError."""

    def remote(name: str | None) -> bool:
        return name is not None and split_model(name, remotes or {}) is not None

    requested = options.model
    if requested is None and continued and (remote(continued) or _is_installed(store, continued)):
        requested = continued
    if requested is None and remote(options.default_model):
        requested = options.default_model
    if remote(requested):
        return requested  # type: ignore[return-value]  # remote() saw it is a str
    return store.choose(requested, options.default_model).name


def weight_format_for(choice: str | None, recorded: str | None) -> str:
    """--quantize or the config's, else the format `pull --quantize` recorded, else auto."""
    return choice or recorded or "auto"


def _system_prompt(given: GivenOptions, history: HistoryStore) -> str | None:
    """--system, else the prompt of --preset; None when neither is given."""
    if given.system is not None:
        return given.system
    if given.preset is None:
        return None
    try:
        return preset_prompt(history, given.preset)
    except KeyError:
        names = ", ".join(all_presets(history))
        raise OptionsError(f"no preset named {given.preset!r} (presets: {names})") from None


def _is_installed(store: ModelStore, name: str) -> bool:
    try:
        store.get(name)
    except StoreError:
        return False
    return True


def _pick(flag, configured):
    return flag if flag is not None else configured
