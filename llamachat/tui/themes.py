"""Themes are data: TOML files with the fields of a Textual Theme. The ones shipped live in the
top-level themes/ folder; users add their own in <config dir>/themes/.

Every field is checked when the file loads, because Textual only finds a bad value when the theme
is applied, and then the app dies (a colour that does not parse, `dark = "yes"`)."""

from __future__ import annotations

import math
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.css.stylesheet import Stylesheet, StylesheetError
from textual.css.tokenize import tokenize_value
from textual.css.tokenizer import TokenError
from textual.dom import DOMNode
from textual.theme import Theme

DEFAULT_THEME = "llamachat-dark"
_COLOURS = (
    "primary",
    "secondary",
    "warning",
    "error",
    "success",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
)
_NUMBERS = ("luminosity_spread", "text_alpha")
_FIELDS = {"name", *_COLOURS, "dark", *_NUMBERS, "variables"}


class ThemeError(ValueError):
    """A theme file's value that Textual cannot use."""


@dataclass(frozen=True)
class ThemeProblem:
    path: Path
    reason: str


def shipped_theme_folders() -> list[Path]:
    """themes/ beside the package (a checkout or an editable install), and where a wheel puts it."""
    package_root = Path(__file__).resolve().parents[2]
    return [package_root / "themes", Path(sys.prefix) / "share" / "llamachat" / "themes"]


def load_themes(
    folders: list[Path], check: Callable[[Theme], str | None] = lambda theme: None
) -> tuple[list[Theme], list[ThemeProblem]]:
    """Every *.toml theme in `folders`, in order; a later file with the same name wins. Files
    that do not parse or hold a bad value (or that `check` finds a reason against) are reported,
    not fatal: a bad user theme must not stop the app."""
    themes: dict[str, Theme] = {}
    problems = []
    for folder in folders:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                theme = parse_theme(tomllib.loads(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, ThemeError, tomllib.TOMLDecodeError) as error:
                problems.append(ThemeProblem(path, str(error)))
                continue
            reason = check(theme)
            if reason is not None:
                problems.append(ThemeProblem(path, reason))
                continue
            themes[theme.name] = theme
    return list(themes.values()), problems


def parse_theme(data: dict[str, Any]) -> Theme:
    """A Theme from a file's table, every value checked; ThemeError names the first bad one."""
    unknown = set(data) - _FIELDS
    if unknown:
        raise ThemeError(f"unknown keys {', '.join(sorted(unknown))}")
    for required in ("name", "primary"):
        if required not in data:
            raise ThemeError(f"{required} is missing")
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ThemeError(f"name must be text, not {data['name']!r}")
    for key in _COLOURS:
        if key in data:
            _check_colour(key, data[key])
    if "dark" in data and not isinstance(data["dark"], bool):
        raise ThemeError(f"dark must be true or false, not {data['dark']!r}")
    for key in _NUMBERS:
        value = data.get(key, 0.0)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ThemeError(f"{key} must be a number, not {value!r}")
    if "variables" in data:
        _check_variables(data["variables"])
    theme = Theme(**data)
    try:
        theme.to_color_system().generate()  # what Textual does when the theme is applied
    except (ColorParseError, ValueError, TypeError, ArithmeticError) as error:
        raise ThemeError(f"Textual cannot use it: {error}") from None
    return theme


def _check_colour(key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ThemeError(f'{key} must be a colour as text (such as "#1e90ff"), not {value!r}')
    try:
        Color.parse(value)
    except ColorParseError:
        raise ThemeError(f"{key} is not a colour: {value!r}") from None


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, dict):
        raise ThemeError(f"variables must be a table of CSS variables, not {variables!r}")
    for name, value in variables.items():
        if not isinstance(value, str):
            raise ThemeError(f"variables: {name} must be text, not {value!r}")
        try:
            list(tokenize_value(value, ("theme", "")))
        except TokenError:
            raise ThemeError(f"variables: {name} is not a CSS value: {value!r}") from None


def css_problem(theme: Theme, stylesheet: Stylesheet, defaults: dict[str, str]) -> str | None:
    """Why the app's CSS cannot take `theme`'s variables (None when it can). A variable is only
    checked where some CSS uses it, and a widget's CSS joins the app's stylesheet when the widget
    first mounts, so the check parses a copy of `stylesheet` with the CSS of every widget class
    loaded; `defaults` are the app's theme variable defaults."""
    if not theme.variables:
        return None
    trial = stylesheet.copy()
    for node in _loaded_node_classes():
        css = node.__dict__.get("DEFAULT_CSS", "")
        if css:
            trial.add_source(css, read_from=("theme check", node.__qualname__), is_default_css=True)
    colours = {**defaults, **theme.to_color_system().generate()}
    if _parses(trial, {**colours, **theme.variables}):
        return None
    for name, value in theme.variables.items():  # which one
        if not _parses(trial, {**colours, name: value}):
            return f"variables: {name} = {value!r} is not a value the app's CSS accepts there"
    return "variables: the app's CSS does not accept them together"


def _parses(stylesheet: Stylesheet, variables: dict[str, str]) -> bool:
    stylesheet.set_variables(variables)
    try:
        stylesheet.reparse()
    except StylesheetError:
        return False
    return True


def _loaded_node_classes() -> list[type[DOMNode]]:
    found: list[type[DOMNode]] = []
    pending = [DOMNode]
    while pending:
        node = pending.pop()
        found.append(node)
        pending.extend(node.__subclasses__())
    return found
