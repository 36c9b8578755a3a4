"""What a reply uses where neither a flag nor the config decides: the model's own recommendation
(the sampling fields of its generation_config.json), else llamachat's defaults.

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

    def sampling_with(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """SamplingParams fields: what the user chose over these defaults."""
        return {**self.sampling, **chosen}


def reply_defaults(folder: Path) -> ReplyDefaults:
    """The defaults for a model folder. A generation_config.json that is missing, unreadable or
    holds values that make no sense (a file is not trusted) leaves llamachat's defaults."""
    recommended = _read(folder / "generation_config.json")
    sampling: dict[str, float | int] = {"repeat_penalty": DEFAULT_REPEAT_PENALTY}
    for key, (name, usable) in _SAMPLING_FIELDS.items():
        value = recommended.get(key)
        if _is_number(value) and usable(value):
            sampling[name] = value
    max_tokens = recommended.get("max_new_tokens")
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0):
        max_tokens = DEFAULT_MAX_TOKENS
    return ReplyDefaults(sampling, max_tokens)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
