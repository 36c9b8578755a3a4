"""Ctrl+F: search every message; Enter opens the conversation a hit belongs to."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from ...history.store import HistoryStore


class SearchScreen(ModalScreen[int | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Close"),
        Binding("down", "focus_results", "Results", show=False),
    ]

    def __init__(self, history: HistoryStore):
        super().__init__(classes="dialog wide")
        self.history = history

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Search all conversations")
            yield Input(placeholder="text to find", id="query")
            yield OptionList(id="results")

    def on_input_changed(self, event: Input.Changed) -> None:
        results = self.query_one(OptionList)
        results.clear_options()
        if not event.value.strip():
            return
        for hit in self.history.search(event.value.strip()):
            label = f"{hit.title or 'untitled'} · {hit.role}: {hit.snippet}"
            results.add_option(Option(label, id=f"{hit.conversation_id}:{hit.message_id}"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        results = self.query_one(OptionList)
        if results.option_count:
            self.dismiss(int(results.get_option_at_index(0).id.split(":")[0]))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id.split(":")[0]))

    def action_focus_results(self) -> None:
        self.query_one(OptionList).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)
