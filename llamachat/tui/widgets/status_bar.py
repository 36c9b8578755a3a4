"""One line at the foot of the app: the model, its device, how full the context is, what the app
is doing (loading, writing, stopped) and the last reply's figures.

The line is laid out again for every width. When it does not fit, what matters least goes first
(see _REDUCTIONS): the note on what the app is doing and the context meter's numbers stay longest.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.color import Color
from textual.widget import Widget

WARN_FROM = 0.75  # the meter turns to a warning from this fraction of the context
FULL_FROM = 0.9  # and to an alarm from here: the next exchange will push the oldest turns out

_SEPARATOR = " · "
_BAR_WIDTH = 10
_MODEL_MIN_WIDTH = 8
_SHORT_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# What to give up, in this order, until the line fits.
_REDUCTIONS = (
    "bar",  # the meter's bar (its numbers say the same)
    "short device",  # bf16 for bfloat16
    "short unseen",  # "3 unseen" for "3 oldest messages unseen"
    "reused",
    "ttft",
    "device",
    "speed",
    "unseen",  # the meter's colour says so too
    "short model",
)


@dataclass(frozen=True)
class Status:
    model: str = "no model"
    device: str = ""
    context_used: int = 0
    context_size: int = 0
    dropped: int = 0
    time_to_first_token_ms: float | None = None
    tokens_per_s: float | None = None
    reused_tokens: int | None = None
    note: str = ""


def context_level(status: Status) -> str:
    """The meter's level: ok, warning (the context fills up) or full (turns are or will be
    dropped)."""
    if not status.context_size:
        return "ok"
    used = status.context_used / status.context_size
    if status.dropped or used >= FULL_FROM:
        return "full"
    return "warning" if used >= WARN_FROM else "ok"


def status_text(status: Status, width: int, meter_style: Style | str = "") -> Text:
    """The status line in at most `width` cells: the fullest form that fits. `meter_style`
    colours the meter's numbers; its background colours the bar."""
    given_up: set[str] = set()
    for reduction in (None, *_REDUCTIONS):
        if reduction is not None:
            given_up.add(reduction)
        if reduction == "short model":
            line = _line(status, given_up, meter_style, width)
        else:
            line = _line(status, given_up, meter_style)
        if line.cell_len <= width:
            return line
    line.truncate(width, overflow="ellipsis")
    return line


def _line(
    status: Status, given_up: set[str], meter_style: Style | str, width: int | None = None
) -> Text:
    parts: list[Text] = []
    if status.device and "device" not in given_up:
        device = status.device
        if "short device" in given_up:
            device = " ".join(_SHORT_DTYPES.get(word, word) for word in device.split())
        parts.append(Text(device))
    if status.context_size:
        meter = Text().append(f"ctx {status.context_used}/{status.context_size}", meter_style)
        if "bar" not in given_up:
            # The bar fills in the meter's colour (black or white cells on it would read as
            # a gap).
            colour = meter_style.bgcolor if isinstance(meter_style, Style) else None
            bar = _bar(status.context_used, status.context_size)
            meter.append(" ").append(bar, Style(color=colour) if colour else None)
        parts.append(meter)
    if status.dropped and "unseen" not in given_up:
        unseen = "unseen" if "short unseen" in given_up else "oldest messages unseen"
        parts.append(Text(f"{status.dropped} {unseen}"))
    if status.time_to_first_token_ms is not None and "ttft" not in given_up:
        parts.append(Text(f"TTFT {status.time_to_first_token_ms:.0f} ms"))
    if status.tokens_per_s and "speed" not in given_up:
        parts.append(Text(f"{status.tokens_per_s:.1f} tok/s"))
    if status.reused_tokens is not None and "reused" not in given_up:
        parts.append(Text(f"reused {status.reused_tokens}"))
    if status.note:
        parts.append(Text(status.note))
    model = Text(status.model)
    if width is not None:
        rest = sum(part.cell_len + len(_SEPARATOR) for part in parts)
        model.truncate(max(_MODEL_MIN_WIDTH, width - rest), overflow="ellipsis")
    return Text(_SEPARATOR).join([model, *parts])


def _bar(used: int, size: int) -> str:
    filled = min(_BAR_WIDTH, round(_BAR_WIDTH * used / size))
    return "█" * filled + "░" * (_BAR_WIDTH - filled)


class StatusBar(Widget):
    """Shows a Status; the meter takes the component style of its level (app.tcss)."""

    COMPONENT_CLASSES = {"status-bar--warning", "status-bar--full"}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.status = Status()

    def show(self, status: Status) -> None:
        self.status = status
        level = context_level(status)
        # "warning" for both levels: the bar asks for attention; "full" says how urgently.
        self.set_class(level != "ok", "warning")
        self.set_class(level == "full", "full")
        self.refresh()

    def render(self) -> Text:
        # Laid out here, not in show(): a resize or a new theme renders again at the new width.
        level = context_level(self.status)
        style: Style | str = ""
        if level != "ok":
            style = self.get_component_rich_style(f"status-bar--{level}")
            if style.bgcolor is not None:
                style += Style(color=_readable_on(Color.from_rich_color(style.bgcolor)))
        return status_text(self.status, self.size.width, style)


def _readable_on(background: Color) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG's relative luminance):
    Textual's `auto` picks white on some themes' bright reds, which reads poorly."""

    def linear(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = background.rgb
    luminance = 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)
    # Contrast with black: (L + 0.05) / 0.05; with white: 1.05 / (L + 0.05).
    return "#000000" if (luminance + 0.05) ** 2 > 0.0525 else "#ffffff"
