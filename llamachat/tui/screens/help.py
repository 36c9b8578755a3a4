"""F1: every key, from the table of actions (actions.py) that the footer and the command palette
are built from too. The list scrolls (arrows, PageUp/PageDown, Home/End) when the terminal is too
short for it."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]]):
        super().__init__(classes="dialog wide")
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 3, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        # The title on the border, so that the list is the box's only child and can take all
        # of its height (app.tcss: #keys).
        with Vertical() as box:
            box.border_title = "llamachat keys · Esc closes"
            with VerticalScroll(id="keys"):
                yield Static(table)

    def action_close(self) -> None:
        self.dismiss(None)
