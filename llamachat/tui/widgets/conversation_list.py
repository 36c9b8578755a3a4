"""The sidebar: saved conversations, newest first."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ...history.store import ConversationSummary


class ConversationList(OptionList):
    BINDINGS = [
        Binding("f2", "app.rename", "Rename", show=False),
        Binding("delete", "app.delete_conversation", "Delete", show=False),
    ]

    def on_mount(self) -> None:
        self.border_title = "Conversations"

    def show(self, conversations: list[ConversationSummary], current: int | None) -> None:
        self.clear_options()
        self.add_options(Option(_label(c), id=str(c.id)) for c in conversations)
        if current is not None:
            self.select(current)

    def select(self, conversation_id: int) -> None:
        try:
            self.highlighted = self.get_option_index(str(conversation_id))
        except Exception:  # not in the list (yet)
            self.highlighted = None


def _label(conversation: ConversationSummary) -> str:
    return conversation.title or "New conversation"
