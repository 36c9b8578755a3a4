"""A conversation's own settings: sampling, reply length and context, chosen for it (in the
chat app's panel, or `llamachat history set`) and kept with it. Unset fields are the flags',
the config's or the model's; flags still win over a conversation's own (chat_options.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

FLOATS = ("temperature", "top_p", "min_p", "repeat_penalty")
INTEGERS = ("top_k", "max_tokens", "ctx")
MIN_CTX = 16  # tokens: the smallest context a conversation may ask for


@dataclass(frozen=True)
class ConversationSettings:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    ctx: int | None = None

    def chosen(self) -> dict[str, float | int]:
        """The fields set, by name."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def to_json(self) -> str:
        return json.dumps(self.chosen(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ConversationSettings:
        """What the history holds; a key this version does not know, or a value of the wrong
        kind (a later version's, a hand edit), is passed over rather than failing the read."""
        try:
            data = json.loads(text or "{}")
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        kept: dict[str, float | int] = {}
        for name, value in data.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if name in FLOATS and number:
                kept[name] = float(value)
            elif name in INTEGERS and isinstance(value, int) and not isinstance(value, bool):
                kept[name] = value
        return cls(**kept)  # type: ignore[arg-type]

    def described(self) -> str:
        """One line for `history show`: "temperature 0.3, max_tokens 200"; "" when none."""
        return ", ".join(f"{name} {value:g}" for name, value in self.chosen().items())
