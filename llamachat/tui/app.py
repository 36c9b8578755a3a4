"""The chat app: conversations on the left, the conversation and its editor on the right.

The model loads and replies generate in thread workers, which only post messages (messages.py)
back; everything that touches a widget runs on the app's event loop, so keys answer while a
reply streams. Every turn goes to the history as it happens.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Markdown, OptionList

from ..history.export import to_json, to_markdown
from ..history.recording import recorded
from ..history.store import HistoryStore, ReplyRecorder
from ..home import Home
from ..models.errors import StoreError
from ..models.store import ModelStore
from ..settings import load as load_settings
from ..settings import save as save_settings
from .messages import ModelFailed, ModelReady, ReplyDone, ReplyFailed, ReplyPiece, ReplyStarted
from .screens.dialogs import ConfirmScreen, PickScreen, TextPromptScreen
from .screens.help import HelpScreen
from .screens.search import SearchScreen
from .screens.system_prompt import PromptChoice, SystemPromptScreen
from .themes import DEFAULT_THEME, load_themes, shipped_theme_folders
from .widgets.chat_view import ChatView, ReplyTurn, SystemNote, UserTurn
from .widgets.conversation_list import ConversationList
from .widgets.prompt_input import PromptInput
from .widgets.status_bar import Status, StatusBar

_CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class ChatAppOptions:
    """What the command line decided (flags over config) for this run of the app."""

    model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    quantize: str | None = None  # None: the format the model's pull recorded, else auto
    ctx: int | None = None
    chat_format: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    max_tokens: int | None = None
    system: str | None = None  # for new conversations
    continue_latest: bool = False
    theme: str | None = None


# Keys that are not bindings of the app itself, for the help screen.
_OTHER_KEYS = [
    ("enter", "send the message"),
    ("shift+enter / ctrl+j", "new line in the message"),
    ("up (editor empty)", "edit your last message and send it again"),
    ("tab / shift+tab", "move between the conversation list, the chat and the editor"),
    ("delete (in the list)", "delete the highlighted conversation"),
    ("ctrl+p", "command palette: every action, themes, export"),
]


class LlamaChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "llamachat"
    BINDINGS = [
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+s", "system_prompt", "System prompt"),
        Binding("ctrl+f", "search", "Search"),
        Binding("ctrl+l", "pick_model", "Switch model"),
        Binding("f3", "copy_reply", "Copy reply"),
        Binding("f4", "copy_code", "Copy last code block", show=False),
        Binding("f2", "rename", "Rename", show=False),
        Binding("f5", "export('md')", "Export as Markdown", show=False),
        Binding("f8", "delete_conversation", "Delete conversation", show=False),
        Binding("ctrl+t", "change_theme", "Change theme", show=False),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, home: Home, options: ChatAppOptions):
        super().__init__()
        self.home = home
        self.options = options
        self.history = HistoryStore(home.history_db)
        self.models = ModelStore(home.models)
        self.model: Any = None  # engine.ChatModel, once loaded
        self.session: Any = None  # engine.ChatSession on it
        self.model_name: str | None = None
        self.conversation_id: int | None = None
        self.new_system = options.system  # the system prompt a new conversation starts with
        self.editing: int | None = None  # the user message being edited and resent
        self.cancel = threading.Event()
        self.generating = False
        self.stream: Any = None  # MarkdownStream of the reply being written
        self.reply_turn: ReplyTurn | None = None
        self.status = Status()
        self._theme_ready = False

    # Layout and start

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield ConversationList(id="conversations")
            with Vertical(id="main"):
                yield ChatView(id="chat")
                yield PromptInput(id="prompt")
                yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        settings = load_settings(self.home.config_file)
        self._register_themes(settings.theme)
        self.refresh_conversations()
        latest = self.history.latest() if self.options.continue_latest else None
        if latest is not None:
            self.open_conversation(latest.id)
        else:
            self.show_status()
        self.query_one(PromptInput).focus()
        try:
            installed = self.models.choose(self.options.model, settings.default_model)
        except StoreError as error:
            self.show_status(model="no model", note=str(error))
            self.notify(str(error), severity="error", timeout=15)
            return
        self.start_loading(installed.name)

    def _register_themes(self, configured: str | None) -> None:
        themes, problems = load_themes([*shipped_theme_folders(), self.home.themes])
        for theme in themes:
            self.register_theme(theme)
        for problem in problems:
            self.notify(f"theme {problem.path.name} skipped: {problem.reason}", severity="warning")
        wanted = self.options.theme or configured or DEFAULT_THEME
        if wanted not in self.available_themes:
            self.notify(f"no theme named {wanted!r}; using {DEFAULT_THEME}", severity="warning")
            wanted = DEFAULT_THEME
        self.theme = wanted
        self._theme_ready = True

    def watch_theme(self, theme: str) -> None:
        """Remember the user's choice for the next start."""
        if self._theme_ready:
            settings = load_settings(self.home.config_file)
            if settings.theme != theme:
                save_settings(self.home.config_file, replace(settings, theme=theme))

    # The model

    def start_loading(self, name: str) -> None:
        self.show_status(model=name, device="", note="loading…")
        self.load_model(name)

    @work(thread=True, exclusive=True, group="model")
    def load_model(self, name: str) -> None:
        try:
            from ..engine import ChatModel

            installed = self.models.get(name)
            model = ChatModel.load(
                installed.path,
                device=self.options.device,
                dtype=self.options.dtype,
                chat_format=self.options.chat_format,
                quantization=self.options.quantize or installed.manifest.quantization or "auto",
            )
            session = model.session(self.options.ctx)
        except Exception as error:  # shown in the app: a bad model must not kill it
            self.post_message(ModelFailed(name, _describe(error)))
            return
        self.post_message(ModelReady(name, model, session))

    def on_model_ready(self, message: ModelReady) -> None:
        self.model, self.session, self.model_name = message.model, message.session, message.name
        dtype = str(self.model.dtype).removeprefix("torch.")
        weights = f" {self.model.quantization}" if self.model.quantization else ""
        self.show_status(
            model=message.name, device=f"{self.model.device} {dtype}{weights}", note=""
        )
        self.update_context_meter()

    def on_model_failed(self, message: ModelFailed) -> None:
        self.show_status(model=message.name, device="", note="failed to load")
        self.notify(
            f"{message.name} failed to load: {message.reason}", severity="error", timeout=15
        )

    # Conversations

    def refresh_conversations(self) -> None:
        self.query_one(ConversationList).show(self.history.conversations(), self.conversation_id)

    def open_conversation(self, conversation_id: int) -> None:
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
            return
        self.conversation_id = conversation_id
        self.editing = None
        conversation = self.history.get(conversation_id)
        self.query_one(ChatView).show(conversation)
        self.query_one(ConversationList).select(conversation_id)
        self.update_context_meter()

    @on(OptionList.OptionSelected, "#conversations")
    def conversation_chosen(self, event: OptionList.OptionSelected) -> None:
        self.open_conversation(int(event.option.id))
        self.query_one(PromptInput).focus()

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
            return
        self.conversation_id = None
        self.editing = None
        self.new_system = self.options.system
        self.query_one(ChatView).show(None)
        self.query_one(ConversationList).highlighted = None
        self.update_context_meter()
        self.query_one(PromptInput).focus()

    # Sending and generating

    @on(PromptInput.Submitted)
    def send(self, event: PromptInput.Submitted) -> None:
        if self.session is None:
            self.notify("the model is not loaded yet", severity="warning")
            return
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
            return
        view = self.query_one(ChatView)
        if self.editing is not None and self.conversation_id is not None:
            self.history.delete_from(self.conversation_id, self.editing)
            view.remove_from(self.editing)
            self.editing = None
        if self.conversation_id is None:
            self.conversation_id = self.history.create(
                model=self.model_name, system_prompt=self.new_system
            )
            if self.new_system:
                view.show(self.history.get(self.conversation_id))
        question = self.history.add_message(self.conversation_id, "user", event.text)
        view.add(UserTurn(event.text, question))
        self.query_one(PromptInput).clear()
        self.refresh_conversations()
        self.generate(question)

    def generate(self, question_id: int | None = None) -> None:
        """Start the reply to the conversation as the history holds it now."""
        assert self.conversation_id is not None
        conversation = self.history.get(self.conversation_id)
        turns = [m for m in conversation.messages if m.role != "system"]
        messages = conversation.chat_messages()
        # chat_messages puts the latest system prompt first; index i of `messages` is turn i - 1.
        offset = len(messages) - len(turns)
        ids = [None] * offset + [m.id for m in turns]
        self.reply_turn = ReplyTurn(status="streaming")
        self.query_one(ChatView).add(self.reply_turn)
        self.stream = Markdown.get_stream(self.reply_turn)
        self.cancel = threading.Event()
        self.generating = True
        self.show_status(note="writing… (Esc stops)")
        self.run_reply(self.conversation_id, messages, ids, question_id, self.cancel)

    @work(thread=True, group="reply")
    def run_reply(
        self,
        conversation_id: int,
        messages: list[dict[str, str]],
        ids: list[int | None],
        question_id: int | None,
        cancel: threading.Event,
    ) -> None:
        from ..engine import ContextOverflowError, SamplingParams

        try:
            sampling = SamplingParams(**self.options.sampling)
            reply = self.session.reply(messages, sampling, self.options.max_tokens, cancel=cancel)
        except (ContextOverflowError, ValueError) as error:
            self.post_message(ReplyFailed(str(error), question_id))
            return
        recorder = ReplyRecorder(self.history, conversation_id, self.model_name)
        unseen = {ids[i] for i in reply.dropped if ids[i] is not None}
        self.post_message(ReplyStarted(recorder.message_id, unseen, len(reply.prompt.token_ids)))
        try:
            for piece in recorded(reply, recorder):
                self.post_message(ReplyPiece(piece))
        except Exception as error:  # shown in the app; the conversation stays usable
            self.post_message(ReplyFailed(_describe(error)))
            return
        if recorder.save_error:  # a full disk: the reply was shown all the same
            self.call_from_thread(self.notify, recorder.save_error, severity="error", timeout=15)
        self.post_message(ReplyDone(reply.stats))

    def on_reply_started(self, message: ReplyStarted) -> None:
        if self.reply_turn is not None:
            self.reply_turn.message_id = message.message_id
        self.query_one(ChatView).mark_unseen(message.unseen)
        self.show_status(dropped=len(message.unseen), context_used=message.prompt_tokens)

    async def on_reply_piece(self, message: ReplyPiece) -> None:
        if self.reply_turn is not None and self.stream is not None:
            self.reply_turn.text += message.text
            await self.stream.write(message.text)
            self.query_one(ChatView).settle()

    async def on_reply_done(self, message: ReplyDone) -> None:
        stats = message.stats
        await self._end_reply("interrupted" if stats.finish_reason == "cancelled" else "complete")
        self.show_status(
            context_used=stats.prompt_tokens + stats.generated_tokens,
            time_to_first_token_ms=stats.time_to_first_token_s * 1000,
            tokens_per_s=stats.decode_tokens_per_s,
            reused_tokens=stats.reused_tokens,
            note="stopped" if stats.finish_reason == "cancelled" else "",
        )
        if self.conversation_id is not None and self.model_name:
            self.history.set_model(self.conversation_id, self.model_name)
        self.refresh_conversations()

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        turn = self.reply_turn
        await self._end_reply("error")
        if message.question_id is not None and self.conversation_id is not None:
            # Nothing was answered (the message does not fit): take the question back.
            self.history.delete_from(self.conversation_id, message.question_id)
            self.query_one(ChatView).remove_from(message.question_id)
            if turn is not None:
                turn.remove()
        self.show_status(note="")
        self.notify(message.reason, severity="error", timeout=15)

    async def _end_reply(self, status: str) -> None:
        if self.stream is not None:
            await self.stream.stop()
        if self.reply_turn is not None:
            self.reply_turn.set_status(status)
        self.query_one(ChatView).settle()
        self.stream = None
        self.generating = False

    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()
        elif self.editing is not None:
            self.editing = None
            self.query_one(PromptInput).clear()
            self.show_status(note="")

    def action_regenerate(self) -> None:
        last = self.query_one(ChatView).last(ReplyTurn)
        turns = self.query_one(ChatView).turns()
        if self.generating or self.session is None or last is None or turns[-1] is not last:
            self.notify("nothing to regenerate", severity="warning")
            return
        if last.message_id is not None and self.conversation_id is not None:
            self.history.delete_from(self.conversation_id, last.message_id)
        last.remove()
        self.generate()

    def on_key(self, event) -> None:
        """Up in an empty editor takes the last message back for editing."""
        prompt = self.query_one(PromptInput)
        if event.key == "up" and prompt.has_focus and not prompt.text and not self.generating:
            event.stop()
            self.action_edit_last()

    def action_edit_last(self) -> None:
        last = self.query_one(ChatView).last(UserTurn)
        if last is None or last.message_id is None or self.generating:
            return
        self.editing = last.message_id
        prompt = self.query_one(PromptInput)
        prompt.text = last.text
        prompt.move_cursor(prompt.document.end)
        prompt.focus()
        self.show_status(note="editing your last message: Enter resends, Esc cancels")

    # System prompt and model

    def action_system_prompt(self) -> None:
        current = self.new_system
        if self.conversation_id is not None:
            current = self.history.get(self.conversation_id).system_prompt
        self.push_screen(SystemPromptScreen(self.history, current), self._apply_system_prompt)

    def _apply_system_prompt(self, choice: PromptChoice | None) -> None:
        if choice is None:
            return
        if self.conversation_id is None:
            self.new_system = choice.prompt or None
            self.query_one(ChatView).add(SystemNote(choice.prompt))
            return
        message_id = self.history.set_system_prompt(self.conversation_id, choice.prompt)
        self.query_one(ChatView).add(SystemNote(choice.prompt, message_id))

    def action_pick_model(self) -> None:
        choices = [
            (m.name, f"{m.name} ({m.manifest.weights}, {m.manifest.source})")
            for m in self.models.installed()
        ]
        if not choices:
            self.notify("no models installed: run `llamachat pull smollm2`", severity="error")
            return
        self.push_screen(PickScreen("Switch model", choices, self.model_name), self._switch_model)

    def _switch_model(self, name: str | None) -> None:
        if name is None or name == self.model_name:
            return
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
            return
        self.model = self.session = None
        self.start_loading(name)
        if self.conversation_id is not None:
            self.history.set_model(self.conversation_id, name)

    # Search, rename, delete, export, copy

    def action_search(self) -> None:
        self.push_screen(SearchScreen(self.history), self._open_found)

    def _open_found(self, conversation_id: int | None) -> None:
        if conversation_id is not None:
            self.open_conversation(conversation_id)

    def action_rename(self) -> None:
        target = self._target_conversation()
        if target is None:
            return
        title = self.history.get(target).summary.title
        self.push_screen(
            TextPromptScreen("Rename conversation", title), lambda t: self._rename(target, t)
        )

    def _rename(self, conversation_id: int, title: str | None) -> None:
        if title:
            self.history.rename(conversation_id, title)
            self.refresh_conversations()

    def action_delete_conversation(self) -> None:
        target = self._target_conversation()
        if target is None:
            return
        title = self.history.get(target).summary.title or "this conversation"
        self.push_screen(ConfirmScreen(f"Delete {title!r}?"), lambda yes: self._delete(target, yes))

    def _delete(self, conversation_id: int, confirmed: bool | None) -> None:
        if not confirmed:
            return
        self.history.delete(conversation_id)
        if conversation_id == self.conversation_id:
            self.action_new_chat()
        self.refresh_conversations()

    def _target_conversation(self) -> int | None:
        """The conversation highlighted in the list when it has focus, else the open one."""
        listing = self.query_one(ConversationList)
        if listing.has_focus and listing.highlighted is not None:
            return int(listing.get_option_at_index(listing.highlighted).id)
        if self.conversation_id is None:
            self.notify("no conversation is open", severity="warning")
        return self.conversation_id

    def action_export(self, kind: str) -> None:
        if self.conversation_id is None:
            self.notify("no conversation is open", severity="warning")
            return
        conversation = self.history.get(self.conversation_id)
        text = to_json(conversation) if kind == "json" else to_markdown(conversation)
        path = Path.cwd() / f"llamachat-{conversation.id}.{kind}"
        path.write_text(text, encoding="utf-8")
        self.notify(f"exported to {path}")

    def action_copy_reply(self) -> None:
        last = self.query_one(ChatView).last(ReplyTurn)
        if last is None or not last.text:
            self.notify("no reply to copy", severity="warning")
            return
        self.copy_to_clipboard(last.text)
        self.notify("reply copied")

    def action_copy_code(self) -> None:
        last = self.query_one(ChatView).last(ReplyTurn)
        blocks = _CODE_BLOCK.findall(last.text) if last is not None else []
        if not blocks:
            self.notify("the last reply has no code block", severity="warning")
            return
        self.copy_to_clipboard(blocks[-1])
        self.notify("code block copied")

    def action_help(self) -> None:
        keys = [(b.key, b.description) for b in self.BINDINGS if isinstance(b, Binding)]
        self.push_screen(HelpScreen(keys + _OTHER_KEYS))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("New chat", "Start a new conversation", self.action_new_chat),
            ("Regenerate", "Write the last reply again", self.action_regenerate),
            (
                "Edit last message",
                "Edit your last message and send it again",
                self.action_edit_last,
            ),
            ("Stop", "Stop the reply being written", self.action_stop),
            (
                "System prompt",
                "Edit the system prompt or apply a preset",
                self.action_system_prompt,
            ),
            ("Search", "Search all conversations", self.action_search),
            ("Switch model", "Choose another installed model", self.action_pick_model),
            ("Rename conversation", "Give the conversation a title", self.action_rename),
            ("Delete conversation", "Delete the conversation", self.action_delete_conversation),
            (
                "Export as Markdown",
                "Write the conversation to a .md file",
                lambda: self.action_export("md"),
            ),
            (
                "Export as JSON",
                "Write the conversation to a .json file",
                lambda: self.action_export("json"),
            ),
            ("Copy reply", "Copy the last reply to the clipboard", self.action_copy_reply),
            ("Copy code block", "Copy the last reply's last code block", self.action_copy_code),
            ("Help", "Show every key", self.action_help),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

    # Status bar

    def show_status(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        self.query_one(StatusBar).show(self.status)

    def update_context_meter(self) -> None:
        if self.session is None:
            return
        messages = (
            self.history.get(self.conversation_id).chat_messages() if self.conversation_id else []
        )
        used = len(self.model.prompt_ids(messages)) if messages else 0
        self.show_status(context_used=used, context_size=self.session.ctx, dropped=0)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if "out of memory" in text.lower():
        hint = "out of GPU memory: start with a smaller --ctx, or pick a smaller model"
        return f"{text.splitlines()[0]} — {hint}"
    return text.splitlines()[0]


def make_app(home: Home, options: ChatAppOptions) -> LlamaChatApp:
    return LlamaChatApp(home, options)
