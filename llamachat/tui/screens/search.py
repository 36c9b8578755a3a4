"""Ctrl+F: search every message; Enter (or ↓ to a hit, then Enter) opens the conversation at the
message found."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from ...history.store import HistoryStore


@dataclass(frozen=True)
class Found:
    conversation_id: int
    message_id: int


class SearchScreen(ModalScreen[Found | None]):
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
            yield Label("", id="no-matches")
            yield OptionList(id="results")

    def on_mount(self) -> None:
        self.query_one("#no-matches").display = False

    def on_input_changed(self, event: Input.Changed) -> None:
        results = self.query_one(OptionList)
        results.clear_options()
        text = event.value.strip()
        hits = self.history.search(text) if text else []
        for hit in hits:
            label = f"{hit.title or 'untitled'} · {hit.role}: {hit.snippet}"
            results.add_option(Option(label, id=f"{hit.conversation_id}:{hit.message_id}"))
        no_matches = self.query_one("#no-matches", Label)
        no_matches.update(f"no matches for {text!r}")
        no_matches.display = bool(text) and not hits

    def on_input_submitted(self, event: Input.Submitted) -> None:
        results = self.query_one(OptionList)
        if results.option_count:
            self.dismiss(_found(results.get_option_at_index(0)))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(_found(event.option))

    def action_focus_results(self) -> None:
        results = self.query_one(OptionList)
        if results.option_count and not results.has_focus:
            results.focus()
            if results.highlighted is None:  # one ↓ reaches the first hit, not two
                results.highlighted = 0

    def action_cancel(self) -> None:
        self.dismiss(None)


def _found(option: Option) -> Found:
    conversation_id, message_id = str(option.id).split(":")
    return Found(int(conversation_id), int(message_id))
