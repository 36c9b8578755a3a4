"""The sidebar: saved conversations, newest first. F9 hides and shows it; in a narrow terminal
it folds away by itself, and comes back when the terminal widens, unless the user decided."""

from __future__ import annotations

from datetime import datetime

from textual.binding import Binding
from textual.content import Content
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ...history.store import ConversationSummary
from .prompt_input import PromptInput

NARROW = 90  # columns: below this the sidebar would leave the chat too little room


class ConversationList(OptionList):
    BINDINGS = [
        Binding("f2", "app.rename", "Rename", show=False),
        Binding("delete", "app.delete_conversation", "Delete", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chosen: bool | None = None  # shown or hidden with F9; None: by the terminal's width

    def on_mount(self) -> None:
        self.border_title = "Conversations"
        self.fit(self.app.size.width)

    def fit(self, width: int) -> None:
        """Show or hide for a terminal `width` columns wide."""
        self._show(self.chosen if self.chosen is not None else width >= NARROW)

    def toggle(self) -> None:
        """The user's choice, kept at every width from now on."""
        self.chosen = not self.display
        self._show(self.chosen)

    def _show(self, shown: bool) -> None:
        if not shown and self.has_focus:
            self.screen.focus_next(PromptInput)
        self.display = shown

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


def _label(conversation: ConversationSummary) -> Content:
    """The title, and under it when the conversation last changed and with which model: three
    chats titled "Say OK." must not look the same."""
    about = [_when(conversation.updated_at)]
    if conversation.model:
        about.append(conversation.model)
    return Content.assemble(
        conversation.title or "New conversation", "\n", (" · ".join(about), "dim")
    )


def _when(timestamp: str) -> str:
    """Today: 14:05; this year: 3 Mar 14:05; before: 3 Mar 2024 (in local time)."""
    when = datetime.fromisoformat(timestamp).astimezone()
    now = datetime.now().astimezone()
    if when.date() == now.date():
        return f"{when:%H:%M}"
    if when.year == now.year:
        return f"{when.day} {when:%b %H:%M}"
    return f"{when.day} {when:%b %Y}"
