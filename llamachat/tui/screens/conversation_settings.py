"""Ctrl+O: the conversation's own settings in one panel: its model, context, system prompt,
sampling and reply length, kept with it in the history and used for it over the config's; a
number left blank is the config's, the flags' or the model's. Flags given on the command line
still win (ChatOptions.for_conversation)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, TextArea

from ...backends.base import Sampling
from ...history.conversation_settings import FLOATS, MIN_CTX, ConversationSettings

# (field, label, hint shown while blank), in the panel's order after the model, two a row.
FIELDS = (
    ("ctx", "Context", "tokens"),
    ("max_tokens", "Max tokens", "a reply"),
    ("temperature", "Temperature", "0: greedy"),
    ("repeat_penalty", "Repeat penalty", "1: off"),
    ("top_p", "Top-p", "1: off"),
    ("top_k", "Top-k", "0: off"),
    ("min_p", "Min-p", "0: off"),
)


@dataclass(frozen=True)
class PanelChoice:
    """What the panel was applied with."""

    settings: ConversationSettings
    model: str | None  # None: none was chosen (none listed, none open)
    system_prompt: str  # "": none


class ConversationSettingsScreen(ModalScreen[PanelChoice | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        current: ConversationSettings,
        model: str | None = None,
        models: list[tuple[str, str]] | None = None,
        system_prompt: str | None = None,
        most_ctx: int = 0,
    ):
        super().__init__(classes="dialog wide")
        self.current = current
        self.model = model
        self.most_ctx = most_ctx  # the open model's context length; 0: not known
        # (name, label) as Ctrl+L lists them; the open model is offered even when not listed.
        self.models = list(models or [])
        if model is not None and model not in {name for name, _ in self.models}:
            self.models.insert(0, (model, model))
        self.system_prompt = system_prompt or ""

    def compose(self) -> ComposeResult:
        chosen = self.current.chosen()
        with Vertical() as box:
            box.border_title = "This conversation's settings"
            yield Label("Blank: the default · Enter in a number applies · Esc cancels")
            with VerticalScroll(id="fields"):
                with Grid(id="numbers"):
                    yield Label("Model")
                    choices = [(name, name) for name, _ in self.models]  # Ctrl+L's describe
                    # None open: blank, so that applying the numbers opens none unasked.
                    none = self.model is None
                    value = Select.NULL if none else self.model
                    yield Select(
                        choices, prompt="none open", value=value, allow_blank=none, id="model"
                    )
                    for name, label, hint in FIELDS:
                        yield Label(label)
                        number = chosen.get(name)
                        text = "" if number is None else f"{number:g}"
                        yield Input(text, placeholder=hint, id=name)
                yield Label("System prompt (Ctrl+S has presets)")
                yield TextArea(self.system_prompt, id="system_prompt", soft_wrap=True)
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
        model = self.query_one("#model", Select).value
        try:
            settings = self._read()
            # Another model's length is not known before it opens: that opening says.
            if model == self.model and self.most_ctx and (settings.ctx or 0) > self.most_ctx:
                raise ValueError(f"the context must be at most {self.most_ctx:,} tokens")
        except ValueError as error:
            self.query_one("#problem", Label).update(str(error))
            return
        self.dismiss(
            PanelChoice(
                settings,
                model if isinstance(model, str) else None,
                self.query_one("#system_prompt", TextArea).text.strip(),
            )
        )

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _read(self) -> ConversationSettings:
        """The numbers as typed, checked as every front end checks them; ValueError says why."""
        values: dict[str, float | int] = {}
        for name, label, _ in FIELDS:
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
        if values.get("ctx", MIN_CTX) < MIN_CTX:
            raise ValueError(f"the context must be {MIN_CTX} tokens or more")
        Sampling(**{k: v for k, v in values.items() if k not in ("max_tokens", "ctx")})
        return ConversationSettings(**values)  # type: ignore[arg-type]
