"""A Chatfile: what `llamachat create` builds a model from, one directive a line.

    # comments and blank lines are ignored
    FROM smollm2                   the installed base model (required, once)
    ADAPTER ./my-lora              a PEFT LoRA folder; several apply in order
    SYSTEM You answer in French.   the system prompt a conversation gets when it has none
    SYSTEM \"\"\"                     ... or a block of lines, up to a line of three quotes
    Several lines.
    \"\"\"
    FORMAT chatml                  the chat format (a built-in name, or `model`: its template)
    PARAMETER temperature 0.3      a reply default: temperature, top_p, top_k, min_p,
                                   repeat_penalty, max_tokens

Directive names are case-insensitive, as in ollama's Modelfile, whose FROM, ADAPTER, SYSTEM and
PARAMETER mean the same here; its TEMPLATE and MESSAGE are refused by name. A relative ADAPTER
path is relative to the Chatfile's folder. Reads no weights: nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..models.errors import SpecError

_QUOTES = '"""'


class ChatfileError(SpecError):
    """A Chatfile or a create flag that cannot be used: the message names the line or flag."""


def _positive_int(value: float) -> bool:
    return value == int(value) and value > 0


# Our parameter names, what each takes, and which values make sense.
PARAMETERS: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "temperature": (float, lambda v: v >= 0, "0 or more"),
    "top_p": (float, lambda v: 0 < v <= 1, "above 0, at most 1"),
    "top_k": (int, lambda v: v >= 0, "a whole number, 0 or more"),
    "min_p": (float, lambda v: 0 <= v < 1, "from 0 to below 1"),
    "repeat_penalty": (float, lambda v: v > 0, "above 0"),
    "max_tokens": (int, _positive_int, "a whole number above 0"),
}


@dataclass(frozen=True)
class Recipe:
    """What a created model is made of."""

    base: str | None = None
    adapters: tuple[Path, ...] = ()
    system: str | None = None
    chat_format: str | None = None
    parameters: dict[str, float | int] = field(default_factory=dict)

    def overridden(
        self,
        base: str | None,
        adapters: tuple[Path, ...],
        system: str | None,
        chat_format: str | None,
        parameters: dict[str, float | int],
    ) -> Recipe:
        """The recipe with the flags over it: the flags' adapters apply after the file's."""
        return replace(
            self,
            base=base if base is not None else self.base,
            adapters=self.adapters + adapters,
            system=system if system is not None else self.system,
            chat_format=chat_format if chat_format is not None else self.chat_format,
            parameters={**self.parameters, **parameters},
        )


def parse_parameter(name: str, text: str, where: str) -> tuple[str, float | int]:
    """One PARAMETER (or --param) value, checked. `where` names it in the error."""
    key = name.lower()
    if key not in PARAMETERS:
        known = ", ".join(PARAMETERS)
        raise ChatfileError(f"{where}: unknown parameter {name!r} (known: {known})")
    kind, usable, expected = PARAMETERS[key]
    try:
        value = float(text)
    except ValueError:
        raise ChatfileError(f"{where}: {key} must be a number, not {text!r}") from None
    if not math.isfinite(value) or not usable(value) or (kind is int and value != int(value)):
        raise ChatfileError(f"{where}: {key} must be {expected}, not {text}")
    return key, int(value) if kind is int else value


def read_chatfile(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatfileError(f"no Chatfile at {path}") from None
    except UnicodeDecodeError:
        raise ChatfileError(f"{path} is not UTF-8 text") from None
    except OSError as error:
        raise ChatfileError(f"cannot read {path}: {error.strerror}") from None
    return parse_chatfile(text, path.parent, path.name)


def parse_chatfile(text: str, folder: Path, name: str = "Chatfile") -> Recipe:
    """The recipe `text` describes; relative ADAPTER paths resolved against `folder`."""
    recipe = Recipe()
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        directive, _, argument = line.partition(" ")
        directive, argument = directive.upper(), argument.strip()
        where = f"{name} line {number}"
        if directive == "SYSTEM" and argument.startswith(_QUOTES):
            argument, index = _block(argument[3:], lines, index, where)
        elif not argument:
            raise ChatfileError(f"{where}: {directive} needs a value")
        if directive == "FROM":
            if recipe.base is not None:
                raise ChatfileError(f"{where}: a second FROM (a model has one base)")
            recipe = replace(recipe, base=argument)
        elif directive == "ADAPTER":
            adapter = Path(argument).expanduser()
            adapter = adapter if adapter.is_absolute() else folder / adapter
            recipe = replace(recipe, adapters=(*recipe.adapters, adapter))
        elif directive == "SYSTEM":
            recipe = replace(recipe, system=argument)
        elif directive == "FORMAT":
            recipe = replace(recipe, chat_format=argument)
        elif directive == "PARAMETER":
            key, _, value = argument.partition(" ")
            if not value.strip():
                raise ChatfileError(f"{where}: PARAMETER needs a name and a value")
            key, number_value = parse_parameter(key, value.strip(), where)
            recipe = replace(recipe, parameters={**recipe.parameters, key: number_value})
        elif directive in ("TEMPLATE", "MESSAGE", "LICENSE"):
            raise ChatfileError(
                f"{where}: {directive} is not supported (FORMAT names a chat format)"
            )
        else:
            raise ChatfileError(
                f"{where}: unknown directive {directive!r}"
                " (FROM, ADAPTER, SYSTEM, FORMAT, PARAMETER)"
            )
    return recipe


def _block(first: str, lines: list[str], index: int, where: str) -> tuple[str, int]:
    """A triple-quoted SYSTEM value from the rest of its first line on, and the line after."""
    if first.rstrip().endswith(_QUOTES):  # SYSTEM """one line"""
        return first.rstrip()[:-3].strip(), index
    taken = [first] if first.strip() else []
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.rstrip().endswith(_QUOTES):
            taken.append(line.rstrip()[:-3])
            return "\n".join(taken).strip("\n"), index
        taken.append(line)
    raise ChatfileError(f"{where}: the SYSTEM block has no closing {_QUOTES}")
