"""The conversation: user turns as text, replies as Markdown (streamed as they grow), system
prompt changes as notes. Turns the model no longer sees are dimmed; a turn with siblings (other
branches of the conversation) says which of them it is, ‹2/3›, on its top edge. With the view
focused, ↑/↓ (or a click) select a turn for the actions on one message (actions.py: in_chat)."""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from textual import events
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownFence

from ...history.recording import CUT_BY
from ...history.store import Conversation, Siblings, StoredMessage
from ..actions import chat_bindings


class Turn(Widget):
    """What every message widget carries: its id in the history, and where it stands among its
    siblings when it has any."""

    message_id: int | None = None

    def set_branch(self, siblings: Siblings | None) -> None:
        """Show ‹index/count› when the message has siblings; nothing when it is the only one."""
        branched = siblings is not None and siblings.count > 1
        self.border_title = f"‹{siblings.index + 1}/{siblings.count}›" if branched else None
        self.set_class(branched, "branched")


class UserTurn(Static, Turn):
    def __init__(self, text: str, message_id: int | None = None):
        super().__init__(text, markup=False, classes="turn user")
        self.message_id = message_id
        self.text = text


class SystemNote(Static, Turn):
    def __init__(self, text: str, message_id: int | None = None):
        label = f"System prompt: {text}" if text else "System prompt cleared"
        super().__init__(label, markup=False, classes="turn system")
        self.message_id = message_id


class CodeBlock(MarkdownFence):
    """A fenced code block, framed, with its language on the frame (app.tcss)."""

    def on_mount(self) -> None:
        self.border_title = self.lexer or None

    def set_content(self, content: Content) -> None:
        # Called again as a streamed block grows: the language arrives with its first line.
        super().set_content(content)
        self.border_title = self.lexer or None


def _chat_markdown() -> MarkdownIt:
    """GitHub-flavoured Markdown where a single newline breaks the line, as chat UIs render
    replies (a poem's lines stay lines). Only breaks inside a paragraph, a list item or a quote
    change: code blocks and tables have no soft breaks."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("soft_breaks_are_hard", _hard_breaks)
    return parser


def _hard_breaks(state: StateCore) -> None:
    # The "breaks" option only changes markdown-it's HTML renderer; Textual reads the tokens.
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


class ReplyTurn(Markdown, Turn):
    BLOCKS = {**Markdown.BLOCKS, "fence": CodeBlock, "code_block": CodeBlock}

    def __init__(
        self,
        text: str = "",
        message_id: int | None = None,
        status: str = "complete",
        finish_reason: str | None = None,
    ):
        super().__init__(text, classes="turn assistant", parser_factory=_chat_markdown)
        self.message_id = message_id
        self.text = text
        self.set_status(status, finish_reason)

    def set_status(self, status: str, finish_reason: str | None = None) -> None:
        """Mark how the reply ended: `status` is the history's (complete, interrupted, length,
        error...), `finish_reason` the engine's (stop, length, context, cancelled) when known."""
        self.status = status
        self.finish_reason = finish_reason
        self.set_class(status == "interrupted", "interrupted")
        self.set_class(status == "error", "error")
        self.set_class(status == "length", "cut")
        self.border_subtitle = marker(status, finish_reason)
        self.set_class(bool(self.border_subtitle), "marked")


def marker(status: str, finish_reason: str | None = None) -> str:
    """What a reply that did not end by itself says on its edge ("" for one that did)."""
    if status == "length":
        reason = CUT_BY.get(finish_reason or "")
        return f"cut: {reason}" if reason else "cut: limit reached"
    return {"interrupted": "stopped", "error": "failed"}.get(status, "")


class ChatView(VerticalScroll):
    BINDINGS = [
        Binding("up", "move(-1)", "Select the message before", show=False),
        Binding("down", "move(1)", "Select the message after", show=False),
        Binding("home", "move_to(0)", "Select the first message", show=False),
        Binding("end", "move_to(-1)", "Select the last message", show=False),
        *chat_bindings(),
    ]

    selected: Turn | None = None  # the turn the actions on one message act on

    def show(self, conversation: Conversation | None, select: int | None = None) -> None:
        """Show the conversation's active path; `select`: the message to keep the cursor on."""
        self.remove_children()
        self.selected = None
        if conversation is not None:
            turns = [_widget(message, conversation) for message in conversation.messages]
            self.mount_all(turns)
            chosen = [t for t in turns if select is not None and t.message_id == select]
            if chosen:
                self.select(chosen[0])
        if self.selected is None:
            self.scroll_end(animate=False)
            self.anchor()

    def add(self, turn: Turn) -> None:
        self.mount(turn)
        self.anchor()

    def settle(self) -> None:
        """After a reply, lay out and paint the whole view again: the turns above the reply
        have moved up while it streamed, and a terminal must not keep their old cells."""
        self.refresh(layout=True, repaint=True)

    def turns(self) -> list[Turn]:
        return [child for child in self.children if isinstance(child, Turn)]

    def last(self, kind: type) -> Turn | None:
        matching = [turn for turn in self.turns() if isinstance(turn, kind)]
        return matching[-1] if matching else None

    def remove_from(self, message_id: int) -> None:
        for turn in self.turns():
            if turn.message_id is not None and turn.message_id >= message_id:
                turn.remove()

    def reveal(self, message_id: int) -> None:
        """Highlight the turn of `message_id` and scroll it into view (a search hit)."""
        found = None
        for turn in self.turns():
            turn.set_class(turn.message_id == message_id, "found")
            if turn.message_id == message_id:
                found = turn
        if found is not None:
            self.anchor(False)  # stay at the turn, not at the end, while the replies render
            self.call_after_refresh(self.scroll_to_widget, found, animate=False, top=True)

    def mark_unseen(self, message_ids: set[int]) -> None:
        for turn in self.turns():
            turn.set_class(turn.message_id in message_ids, "unseen")

    # The selected message

    def select(self, turn: Turn | None) -> None:
        """Put the cursor on `turn` (None: on no turn) and scroll it into view."""
        self.selected = turn
        for each in self.turns():
            each.set_class(each is turn, "selected")
        if turn is not None:
            self.anchor(False)  # stay at the turn, not at the end
            self.call_after_refresh(self.scroll_to_widget, turn, animate=False)

    def _choosable(self) -> list[Turn]:
        return [turn for turn in self.turns() if turn.message_id is not None]

    def action_move(self, step: int) -> None:
        turns = self._choosable()
        if not turns:
            return
        if self.selected not in turns:
            self.select(turns[-1])
            return
        index = turns.index(self.selected) + step
        self.select(turns[min(max(index, 0), len(turns) - 1)])

    def action_move_to(self, index: int) -> None:
        turns = self._choosable()
        if turns:
            self.select(turns[index])

    def on_focus(self) -> None:
        if self.selected is None:
            self.action_move_to(-1)

    def on_click(self, event: events.Click) -> None:
        node = event.widget
        while node is not None and node is not self:
            if isinstance(node, Turn) and node.message_id is not None:
                self.select(node)
                self.focus()
                return
            node = node.parent


def _widget(message: StoredMessage, conversation: Conversation) -> Turn:
    turn: Turn
    if message.role == "user":
        turn = UserTurn(message.content, message.id)
    elif message.role == "system":
        turn = SystemNote(message.content, message.id)
    else:
        # finish_reason: a column of newer histories; older ones only have the status.
        turn = ReplyTurn(
            message.content, message.id, message.status, getattr(message, "finish_reason", None)
        )
    turn.set_branch(conversation.siblings(message.id))
    return turn
