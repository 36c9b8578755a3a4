"""Ctrl+O: the conversation's own settings (sampling and reply length), kept with it in the
history and used for its replies over the config's; a field left blank is the config's, the
flags' or the model's. Flags given on the command line still win (ChatOptions.for_conversation)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from ...backends.base import Sampling
from ...history.conversation_settings import FLOATS, ConversationSettings

# (field, label), in the panel's order; ctx is set with `llamachat history set` (it needs the
# model opened again).
FIELDS = (
    ("temperature", "Temperature (0: greedy)"),
    ("top_p", "Top-p"),
    ("top_k", "Top-k (0: off)"),
    ("min_p", "Min-p"),
    ("repeat_penalty", "Repeat penalty"),
    ("max_tokens", "Max tokens a reply"),
)


class ConversationSettingsScreen(ModalScreen[ConversationSettings | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: ConversationSettings, elsewhere: str = ""):
        super().__init__(classes="dialog")
        self.current = current
        self.elsewhere = elsewhere  # a line on what is set elsewhere (model, system prompt)

    def compose(self) -> ComposeResult:
        chosen = self.current.chosen()
        with Vertical() as box:
            box.border_title = "This conversation's settings"
            yield Label("Blank: the default · Enter applies · Esc cancels")
            for name, label in FIELDS:
                with Horizontal(classes="setting"):
                    yield Label(label)
                    value = chosen.get(name)
                    yield Input("" if value is None else f"{value:g}", id=name)
            if self.elsewhere:
                yield Label(self.elsewhere, id="elsewhere")
            yield Label("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.action_cancel()

    def action_apply(self) -> None:
        try:
            settings = self._read()
        except ValueError as error:
            self.query_one("#problem", Label).update(str(error))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _read(self) -> ConversationSettings:
        """The fields as typed, checked as every front end checks them; ValueError says why."""
        values: dict[str, float | int] = {}
        for name, label in FIELDS:
            text = self.query_one(f"#{name}", Input).value.strip()
            if not text:
                continue
            try:
                values[name] = float(text) if name in FLOATS else int(text)
            except ValueError:
                kind = "a number" if name in FLOATS else "a whole number"
                raise ValueError(f"{label}: {text!r} is not {kind}") from None
        if values.get("max_tokens", 1) < 1:
            raise ValueError("max tokens must be 1 or more")
        Sampling(**{k: v for k, v in values.items() if k != "max_tokens"})
        return ConversationSettings(**values)  # type: ignore[arg-type]
