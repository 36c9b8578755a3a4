"""What the user can do in the chat app, declared once in ACTIONS: the key, the command palette's
entry and the help screen's row are all built from it, so that the three cannot disagree."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider


@dataclass(frozen=True)
class Action:
    """One thing to do: its palette entry and, where it has one, its key and help-screen row."""

    action: str  # the app's action, as a binding names it: "new_chat", "export('md')"
    title: str  # in the command palette
    help: str = ""  # the palette's line under the title
    key: str | None = None  # the app's key for it; None: the palette only, and no help row
    label: str | None = None  # the key's name in the footer and on the help screen; None: title
    show: bool = True  # in the footer
    priority: bool = False  # before the focused widget's own use of the key
    textual: bool = False  # Textual's own palette command of this title runs it: none of ours
    # The key is the chat view's, for the message selected there (its arrows and Enter are the
    # editor's while the editor has focus); the palette's entry runs the app's action all the same.
    in_chat: bool = False

    @property
    def key_label(self) -> str:
        return self.label or self.title

    def binding(self) -> Binding:
        assert self.key is not None
        # The chat view's binding names the app's action: a widget's binding runs its own.
        action = f"app.{self.action}" if self.in_chat else self.action
        return Binding(self.key, action, self.key_label, show=self.show, priority=self.priority)


# In the order of the footer and the help screen.
ACTIONS: tuple[Action, ...] = (
    Action("new_chat", "New chat", "Start a new conversation", key="ctrl+n"),
    Action("stop", "Stop", "Stop the reply being written", key="escape", label="Stop reply"),
    Action(
        "regenerate",
        "Regenerate",
        "Write the selected reply (else the last) again, as a new branch",
        key="ctrl+r",
    ),
    # The editor's own ↑ (when it is empty) does it too: OTHER_KEYS lists it.
    Action("edit_last", "Edit last message", "Edit your last message and send it again"),
    Action(
        "continue_reply",
        "Continue reply",
        "Go on with the last reply where it stopped or was cut, in the same message",
        key="ctrl+g",
        show=False,
    ),
    Action(
        "select_message",
        "Select a message",
        "Move into the conversation: ↑/↓ choose a message, Esc goes back to the editor",
        key="f6",
        show=False,
        priority=True,  # before the editor's own F6 (select the line); not in dialogs (app.py)
    ),
    Action(
        "edit_message",
        "Edit message",
        "Edit the selected message (else your last) and send it as a new branch",
        key="enter",
        show=False,
        in_chat=True,
    ),
    Action(
        "branch(-1)",
        "Previous branch",
        "Show the selected message's previous sibling (else the last reply's)",
        key="left",
        show=False,
        in_chat=True,
    ),
    Action(
        "branch(1)",
        "Next branch",
        "Show the selected message's next sibling (else the last reply's)",
        key="right",
        show=False,
        in_chat=True,
    ),
    Action(
        "delete_branch",
        "Delete branch",
        "Delete the selected message (else the last) and everything after it",
        key="delete",
        show=False,
        in_chat=True,
    ),
    Action(
        "system_prompt",
        "System prompt",
        "Edit the system prompt or apply a preset",
        key="ctrl+s",
    ),
    Action(
        "conversation_settings",
        "Conversation settings",
        "This conversation's own model, context, system prompt, sampling and reply length",
        key="ctrl+o",
        show=False,
    ),
    Action("search", "Search", "Search all conversations", key="ctrl+f"),
    Action(
        "pick_model", "Switch model", "Choose another model, installed or on a remote", key="ctrl+l"
    ),
    Action(
        "copy_reply",
        "Copy reply",
        "Copy the selected message (else the last reply) to the clipboard",
        key="f3",
    ),
    Action(
        "copy_code",
        "Copy code block",
        "Copy the last code block of the selected reply (else the last reply)",
        key="f4",
        label="Copy last code block",
        show=False,
    ),
    Action(
        "rename",
        "Rename conversation",
        "Give the conversation a title",
        key="f2",
        label="Rename",
        show=False,
    ),
    Action(
        "export('md')",
        "Export as Markdown",
        "Write the conversation to a .md file",
        key="f5",
        show=False,
    ),
    Action("export('json')", "Export as JSON", "Write the conversation to a .json file"),
    Action(
        "delete_conversation",
        "Delete conversation",
        "Delete the conversation",
        key="f8",
        show=False,
    ),
    Action("change_theme", "Theme", key="ctrl+t", label="Change theme", show=False, textual=True),
    Action(
        "toggle_sidebar",
        "Show or hide the conversations",
        "The sidebar (F9)",
        key="f9",
        show=False,
    ),
    Action("help", "Help", "Show every key", key="f1"),
    Action("quit", "Quit", key="ctrl+q", priority=True, textual=True),
    # Not a priority: in an editor with text selected, Ctrl+C copies it first.
    Action(
        "quit",
        "Quit",
        key="ctrl+c",
        label="Quit (or copy the selection)",
        show=False,
        textual=True,
    ),
)

# Keys that are not bindings of the app itself (the editor's, the list's, the palette's), for
# the help screen after the app's own.
OTHER_KEYS: tuple[tuple[str, str], ...] = (
    ("enter", "send the message"),
    ("shift+enter / ctrl+j", "new line in the message"),
    ("up (editor empty)", "edit your last message and send it again"),
    ("tab / shift+tab", "move between the conversation list, the chat and the editor"),
    ("up / down (in the chat)", "select the message before / after"),
    ("home / end (in the chat)", "select the first / last message"),
    ("click (in the chat)", "select a message"),
    ("escape (in the chat)", "back to the editor"),
    ("delete (in the list)", "delete the highlighted conversation"),
    ("ctrl+p", "command palette: every action, themes, export"),
)


def bindings() -> list[Binding]:
    """The app's BINDINGS."""
    return [entry.binding() for entry in ACTIONS if entry.key is not None and not entry.in_chat]


def chat_bindings() -> list[Binding]:
    """The chat view's BINDINGS for the message selected there."""
    return [entry.binding() for entry in ACTIONS if entry.key is not None and entry.in_chat]


def help_rows() -> list[tuple[str, str]]:
    """The help screen's (key, what it does) rows: the app's keys, then the others."""
    own = [(help_key(entry), entry.key_label) for entry in ACTIONS if entry.key is not None]
    return own + list(OTHER_KEYS)


def help_key(entry: Action) -> str:
    """The key as the help screen names it: where it applies when that is not everywhere."""
    assert entry.key is not None
    return f"{entry.key} (in the chat)" if entry.in_chat else entry.key


class ActionCommands(Provider):
    """The command palette: the actions, and Textual's own commands (Theme, Quit, Keys…) in
    one list sorted by title, as Textual's SystemCommandsProvider (which this replaces) shows
    them."""

    def _commands(self, discoverable_only: bool) -> list[tuple[str, str, Callable[[], Any]]]:
        ours = [(e.title, e.help, self._runner(e)) for e in ACTIONS if not e.textual]
        textual = [
            (command.title, command.help, command.callback)
            for command in self.app.get_system_commands(self.screen)
            if command.discover or not discoverable_only
        ]
        return sorted(ours + textual, key=itemgetter(0))

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands(discoverable_only=True):
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands(discoverable_only=False):
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, text=title, help=help_text)

    def _runner(self, entry: Action) -> Callable[[], Awaitable[bool]]:
        # The action runs as its key runs it: parsed by Textual, arguments and all.
        return partial(self.app.run_action, entry.action)
