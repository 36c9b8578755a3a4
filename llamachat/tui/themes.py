"""Themes are data: TOML files with the fields of a Textual Theme. The ones shipped live in the
top-level themes/ folder; users add their own in <config dir>/themes/."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.theme import Theme

DEFAULT_THEME = "llamachat-dark"
_FIELDS = {
    "name",
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
    "dark",
    "luminosity_spread",
    "text_alpha",
    "variables",
}


@dataclass(frozen=True)
class ThemeProblem:
    path: Path
    reason: str


def shipped_theme_folders() -> list[Path]:
    """themes/ beside the package (a checkout or an editable install), and where a wheel puts it."""
    package_root = Path(__file__).resolve().parents[2]
    return [package_root / "themes", Path(sys.prefix) / "share" / "llamachat" / "themes"]


def load_themes(folders: list[Path]) -> tuple[list[Theme], list[ThemeProblem]]:
    """Every *.toml theme in `folders`, in order; a later file with the same name wins. Files
    that do not parse are reported, not fatal: a bad user theme must not stop the app."""
    themes: dict[str, Theme] = {}
    problems = []
    for folder in folders:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
                unknown = set(data) - _FIELDS
                if unknown:
                    raise ValueError(f"unknown keys {', '.join(sorted(unknown))}")
                theme = Theme(**data)
            except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as error:
                problems.append(ThemeProblem(path, str(error)))
                continue
            themes[theme.name] = theme
    return list(themes.values()), problems
