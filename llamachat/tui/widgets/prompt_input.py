"""The message editor: multi-line, Enter sends, Shift+Enter or Ctrl+J starts a new line, and ↑ in
an empty editor asks for the last message back, to edit and resend."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    EDITING_TITLE = "editing your message — Enter resends, Esc cancels"

    @dataclass
    class Submitted(Message):
        text: str

    class EditLast(Message):
        """↑ in the empty editor: the user wants their last message back."""

    def __init__(self, **kwargs) -> None:
        super().__init__(
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            placeholder="Message (Enter sends, Shift+Enter or Ctrl+J for a new line)",
            **kwargs,
        )

    def edit_message(self, text: str) -> None:
        """Show `text` to be edited, the cursor at its end, and say so on the border."""
        self.text = text
        self.move_cursor(self.document.end)
        self.border_title = self.EDITING_TITLE

    def end_editing(self) -> None:
        self.border_title = None

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "up" and not self.text:
            # Handled here, before the cursor's own binding: the app's handling of a key comes
            # after that binding has moved the cursor (to the start of the recalled text).
            event.stop()
            event.prevent_default()
            self.post_message(self.EditLast())
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
