"""Ctrl+S: edit the conversation's system prompt, or start from a preset; save presets."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, OptionList, TextArea
from textual.widgets.option_list import Option

from ...history.presets import all_presets
from ...history.store import HistoryStore
from .dialogs import TextPromptScreen


@dataclass(frozen=True)
class PromptChoice:
    prompt: str


class SystemPromptScreen(ModalScreen[PromptChoice | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "apply", "Apply"),
    ]

    def __init__(self, history: HistoryStore, current: str | None):
        super().__init__(classes="dialog wide")
        self.history = history
        self.current = current or ""

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "System prompt"
            yield Label("Applies from the next turn · Ctrl+S applies · Esc cancels")
            with Horizontal(id="prompt-body"):
                yield OptionList(*self._preset_options(), id="presets")
                yield TextArea(self.current, id="prompt", soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Save as preset", id="save")
                yield Button("Cancel", id="cancel")

    def _preset_options(self) -> list[Option]:
        return [Option(name, id=name) for name in all_presets(self.history)]

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#prompt", TextArea).text = all_presets(self.history)[event.option.id]

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        elif event.button.id == "save":
            self.app.push_screen(TextPromptScreen("Preset name"), self._save_preset)
        else:
            self.action_cancel()

    def _save_preset(self, name: str | None) -> None:
        if name:
            self.history.save_preset(name, self.query_one("#prompt", TextArea).text)
            presets = self.query_one("#presets", OptionList)
            presets.clear_options()
            presets.add_options(self._preset_options())
            self.notify(f"saved preset {name!r}")

    def action_apply(self) -> None:
        self.dismiss(PromptChoice(self.query_one("#prompt", TextArea).text.strip()))

    def action_cancel(self) -> None:
        self.dismiss(None)
