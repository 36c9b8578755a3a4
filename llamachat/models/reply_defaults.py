"""What a reply uses where neither a flag nor the config decides: the model's own recommendation
(a created model's llamachat.json, from its Chatfile's PARAMETER and SYSTEM lines, over the
sampling fields of its generation_config.json), else llamachat's defaults.

Without a repetition penalty greedy decoding of a small model loops until the context is full
(minutes on a CPU), and without a token limit nothing stops it; ollama applies 1.1 by default.
The other sampling defaults are the engine's own (SamplingParams).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_REPEAT_PENALTY = 1.1
DEFAULT_MAX_TOKENS = 2048
CREATED_DEFAULTS = "llamachat.json"

# generation_config.json's name → (SamplingParams' name, whether a value is usable).
_SAMPLING_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "temperature": ("temperature", lambda v: v >= 0),
    "top_p": ("top_p", lambda v: 0 < v <= 1),
    "top_k": ("top_k", lambda v: isinstance(v, int) and v >= 0),
    "min_p": ("min_p", lambda v: 0 <= v < 1),
    "repetition_penalty": ("repeat_penalty", lambda v: v > 0),
}


@dataclass(frozen=True)
class ReplyDefaults:
    sampling: dict[str, float | int] = field(
        default_factory=lambda: {"repeat_penalty": DEFAULT_REPEAT_PENALTY}
    )
    max_tokens: int = DEFAULT_MAX_TOKENS
    system: str | None = None  # for a conversation that has no system prompt of its own
    chat_format: str | None = None  # a created model's FORMAT, under --chat-format

    def sampling_with(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """SamplingParams fields: what the user chose over these defaults."""
        return {**self.sampling, **chosen}


def reply_defaults(folder: Path) -> ReplyDefaults:
    """The defaults for a model folder. A file that is missing, unreadable or holds values that
    make no sense (a file is not trusted) leaves the defaults below it."""
    recommended = _read(folder / "generation_config.json")
    created = _read(folder / CREATED_DEFAULTS)
    chosen = created.get("parameters")
    chosen = chosen if isinstance(chosen, dict) else {}
    sampling: dict[str, float | int] = {"repeat_penalty": DEFAULT_REPEAT_PENALTY}
    for key, (name, usable) in _SAMPLING_FIELDS.items():
        for value in (recommended.get(key), chosen.get(name)):  # the later wins
            if _is_number(value) and usable(value):
                sampling[name] = value
    max_tokens = DEFAULT_MAX_TOKENS
    for value in (recommended.get("max_new_tokens"), chosen.get("max_tokens")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            max_tokens = value
    system, chat_format = created.get("system"), created.get("chat_format")
    return ReplyDefaults(
        sampling,
        max_tokens,
        system if isinstance(system, str) else None,
        chat_format if isinstance(chat_format, str) else None,
    )


def created_defaults(folder: Path) -> dict[str, Any] | None:
    """What a created model's Chatfile set (its system prompt, chat format and parameters), as
    `show` prints it; None for a model that was not created."""
    created = _read(folder / CREATED_DEFAULTS)
    if not created:
        return None
    shown: dict[str, Any] = {
        key: created[key] for key in ("system", "chat_format") if isinstance(created.get(key), str)
    }
    parameters = created.get("parameters")
    if isinstance(parameters, dict):
        shown.update({k: v for k, v in parameters.items() if isinstance(k, str) and _is_number(v)})
    return shown


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
