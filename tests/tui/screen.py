"""What the app shows, read from its own screenshot, for checks that a thing is on screen."""

from __future__ import annotations

import html
import re


def on_screen(app) -> list[str]:
    """The rows the terminal shows (an SVG of text runs, each tagged with its row)."""
    rows: dict[int, str] = {}
    runs = re.findall(r'<text [^>]*line-(\d+)\)">(.*?)</text>', app.export_screenshot())
    for row, text in runs:
        rows[int(row)] = rows.get(int(row), "") + html.unescape(text).replace("\xa0", " ")
    return [rows.get(row, "") for row in range(max(rows) + 1)]
