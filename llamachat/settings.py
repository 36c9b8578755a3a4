"""The user's config file: a flat TOML table of defaults that command-line flags override.

default_model = "smollm2"
system = "You are a concise assistant."
temperature = 0.7
ctx = 4096
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .kv_files import DEFAULT_BUDGET, format_size, parse_size
from .private import tighten, write_private

# The engine's quantize.CHOICES, kept here too so that reading the config and parsing the command
# line never import torch (tests/test_settings.py checks that the two agree).
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4", "fp8", "f16")


class SettingsError(Exception):
    """The config file cannot be read, or a value in it (or given to `config set`) is invalid;
    `exit_code` 2 for a value typed on the command line, 1 for a bad file."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Setting:
    key: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()  # the only values allowed, when not empty
    # Text that must parse (raising ValueError with the reason) as well: a size.
    parse: Callable[[str], Any] | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("default_model", str, "model used when -m is not given"),
    Setting("system", str, "default system prompt"),
    Setting("temperature", float, "sampling temperature (0 = greedy)"),
    Setting("top_p", float, "nucleus sampling mass"),
    Setting("top_k", int, "sample among the k most likely tokens (0 = all)"),
    Setting("min_p", float, "drop tokens below min_p × the best one's probability"),
    Setting("repeat_penalty", float, "penalty for recently seen tokens (1 = off)"),
    Setting("seed", int, "random seed for reproducible sampling"),
    Setting("max_tokens", int, "most tokens in one reply"),
    Setting("ctx", int, "context window in tokens"),
    Setting("device", str, "auto, cpu, cuda or cuda:N"),
    Setting("dtype", str, "float32, bfloat16 or float16"),
    Setting("quantize", str, "weight format: " + ", ".join(QUANTIZE_CHOICES), QUANTIZE_CHOICES),
    Setting("threads", int, "CPU threads (default: the cores other processes leave idle)"),
    Setting("theme", str, "chat app theme"),
    Setting("export_dir", str, "folder the chat app exports to (default: the current one)"),
    Setting(
        "kv_disk_budget",
        str,
        "disk for saved KV caches, to resume conversations without reading them again: 4GB,"
        f" 500MB; 0 saves none (default {format_size(DEFAULT_BUDGET).replace(' ', '')})",
        parse=parse_size,
    ),
)
_BY_KEY = {setting.key: setting for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    default_model: str | None = None
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    ctx: int | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    threads: int | None = None
    theme: str | None = None
    export_dir: str | None = None
    kv_disk_budget: str | None = None

    @property
    def kv_disk_budget_bytes(self) -> int:
        """The budget for saved KV caches in bytes (checked when the value was read)."""
        if self.kv_disk_budget is None:
            return DEFAULT_BUDGET
        return parse_size(self.kv_disk_budget)

    def items(self) -> list[tuple[str, Any]]:
        """The keys that are set, in the documented order."""
        values = [(f.name, getattr(self, f.name)) for f in fields(self)]
        return [(key, value) for key, value in values if value is not None]


def load(path: Path) -> Settings:
    if not path.exists():
        return Settings()
    tighten(path.parent)  # as an older llamachat left them: readable by others
    tighten(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"cannot read {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{path} is not valid TOML: {error}") from None
    values = {}
    for key, value in raw.items():
        values[key] = _checked(key, value, source=str(path))
    return Settings(**values)


def parse_value(key: str, text: str) -> Any:
    """A value typed on the command line (`llamachat config set KEY VALUE`), checked for KEY."""
    setting = _setting(key, source="config set", exit_code=2)
    if setting.kind is str:
        _check_utf8(key, text, exit_code=2)
        return _allowed(setting, text, source="config set", exit_code=2)
    try:
        return setting.kind(text)
    except ValueError:
        raise SettingsError(
            f"{key} takes {_kind_name(setting.kind)}, not {text!r}", exit_code=2
        ) from None


def unset_key(key: str) -> str:
    """A key given to `llamachat config unset`, checked."""
    return _setting(key, source="config unset", exit_code=2).key


def save(path: Path, settings: Settings) -> None:
    """Write atomically: a crash mid-write leaves the old file. The file is private (0600, in a
    0700 folder): the system prompt can say a lot about its user."""
    for key, value in settings.items():
        if isinstance(value, str):
            _check_utf8(key, value)
    text = "".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items())
    write_private(path, text.encode("utf-8"))


def _checked(key: str, value: Any, source: str) -> Any:
    setting = _setting(key, source)
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if setting.parse is not None and type(value) is int:  # kv_disk_budget = 0, in bytes
        value = str(value)
    if not isinstance(value, setting.kind) or isinstance(value, bool):
        raise SettingsError(f"{source}: {key} takes {_kind_name(setting.kind)}, not {value!r}")
    return _allowed(setting, value, source)


def _allowed(setting: Setting, value: Any, source: str, exit_code: int = 1) -> Any:
    if setting.choices and value not in setting.choices:
        choices = ", ".join(setting.choices)
        raise SettingsError(
            f"{source}: {setting.key} takes one of {choices}, not {value!r}", exit_code
        )
    if setting.parse is not None:
        try:
            setting.parse(value)
        except ValueError as error:
            raise SettingsError(f"{source}: {setting.key}: {error}", exit_code) from None
    return value


def _setting(key: str, source: str, exit_code: int = 1) -> Setting:
    try:
        return _BY_KEY[key]
    except KeyError:
        known = ", ".join(_BY_KEY)
        raise SettingsError(
            f"{source}: unknown setting {key!r} (known: {known})", exit_code
        ) from None


def _check_utf8(key: str, text: str, exit_code: int = 1) -> None:
    """Refuse text that cannot be written as UTF-8: bytes that were not UTF-8 on the command
    line reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SettingsError(
            f"{key} must be UTF-8 text, and the value given is not", exit_code
        ) from None


def _kind_name(kind: type) -> str:
    return {str: "text", int: "a whole number", float: "a number"}[kind]


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    return repr(value)
