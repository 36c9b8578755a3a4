"""The chat app: conversations on the left, the conversation and its editor on the right.

The model loads and replies generate in thread workers, which only post messages (messages.py)
back; everything that touches a widget runs on the app's event loop, so keys answer while a
reply streams. Every turn goes to the history as it happens.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Markdown, OptionList

from .. import remotes
from ..backends.base import Chat, ChatSpec, PromptTooLongError, ReplyRequest
from ..backends.routing import Router
from ..chat_options import ChatOptions, OptionsError, chosen_model
from ..history.conversation_settings import ConversationSettings
from ..history.db import HistoryError
from ..history.export import to_json, to_markdown
from ..history.recording import STATUS_BY_FINISH, recorded
from ..history.store import HistoryStore, ReplyRecorder
from ..home import Home
from ..kv_files import ContextFiles
from ..models.errors import StoreError
from ..models.store import ModelStore
from ..settings import Settings, SettingsError
from ..settings import load as load_settings
from ..settings import save as save_settings
from .actions import ActionCommands, bindings, help_rows
from .messages import (
    ModelFailed,
    ModelReady,
    ModelsListed,
    ReplyDone,
    ReplyFailed,
    ReplyPiece,
    ReplyStarted,
    UnshownText,
)
from .screens.conversation_settings import ConversationSettingsScreen, PanelChoice
from .screens.dialogs import ConfirmScreen, PickScreen, TextPromptScreen
from .screens.help import HelpScreen
from .screens.search import Found, SearchScreen
from .screens.system_prompt import PromptChoice, SystemPromptScreen
from .themes import DEFAULT_THEME, css_problem, load_themes, shipped_theme_folders
from .widgets.chat_view import ChatView, ReplyTurn, SystemNote, Turn, UserTurn, marker
from .widgets.conversation_list import ConversationList
from .widgets.prompt_input import PromptInput
from .widgets.status_bar import Status, StatusBar

_CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


class LlamaChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "llamachat"
    BINDINGS = bindings()
    COMMANDS = {ActionCommands}

    def __init__(
        self,
        home: Home,
        options: ChatOptions,
        *,
        history: HistoryStore,
        backend: Router,
        settings: Settings,
    ):
        super().__init__()
        self.home = home
        self.options = options
        self.history = history
        self.backend = backend  # every model: installed, on a remote, loaded by a server here
        self.settings = settings  # the config at start; an export and a theme change read it anew
        self.chat: Chat | None = None  # the model, once opened
        self.model_name: str | None = None
        self.conversation_id: int | None = None
        self.new_system = options.new_system  # the system prompt a new conversation starts with
        self.new_settings = ConversationSettings()  # and its own settings (Ctrl+O before it)
        self.opened_ctx: int | None = None  # the ctx the model was opened with; None: its own
        self.editing: int | None = None  # the user message being edited and resent
        self.cancel = threading.Event()
        self.generating = False
        self.stream: Any = None  # MarkdownStream of the reply being written
        self.reply_turn: ReplyTurn | None = None
        self.continued_from: tuple[str, str | None] = ("error", None)  # status, finish reason
        self.status = Status()
        self._theme_ready = False

    # Layout and start

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield ConversationList(id="conversations")
            with Vertical(id="main"):
                yield ChatView(id="chat")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")  # the terminal's whole width: it has the most to say
        yield Footer()

    def on_mount(self) -> None:
        self._register_themes(self.settings.theme)
        self.refresh_conversations()
        latest = self.history.latest() if self.options.continue_latest else None
        if latest is not None:
            self.open_conversation(latest.id)
        else:
            self.show_status()
        self.query_one(PromptInput).focus()
        continued = latest.model if latest is not None else None  # -c: its model, as the CLI's
        try:
            name = chosen_model(
                self.options, self.backend.store, continued, remotes=self.backend.remotes
            )
        except StoreError as error:
            self.show_status(model="no model", note=str(error))
            self.notify(str(error), severity="error", timeout=15)
            return
        self.start_loading(name)

    def _register_themes(self, configured: str | None) -> None:
        defaults = self.get_theme_variable_defaults()
        themes, problems = load_themes(
            [*shipped_theme_folders(), self.home.themes],
            check=lambda theme: css_problem(theme, self.stylesheet, defaults),
        )
        for theme in themes:
            self.register_theme(theme)
        for problem in problems:
            self.notify(
                f"theme {problem.path.name} skipped: {problem.reason}",
                severity="warning",
                timeout=15,
            )
        wanted = self.options.theme or configured or DEFAULT_THEME
        if wanted not in self.available_themes:
            self.notify(
                f"theme {wanted!r} is missing or broken; using {DEFAULT_THEME}",
                severity="warning",
                timeout=15,
            )
            wanted = DEFAULT_THEME
        self.theme = wanted
        self._theme_ready = True

    def watch_theme(self, theme: str) -> None:
        """Remember the user's choice for the next start."""
        if self._theme_ready:
            settings = load_settings(self.home.config_file)
            if settings.theme != theme:
                save_settings(self.home.config_file, replace(settings, theme=theme))

    def _closing_down(self) -> bool:
        """True once the app has begun to close: a worker's late message (a model that finished
        loading, the end of a cancelled reply) finds its widgets gone and is dropped."""
        return not self.is_running

    # The model

    def start_loading(self, name: str, leaving: Chat | None = None) -> None:
        """Open `name`; `leaving`: the model it replaces, closed (the open conversation's cache
        saved first) on the loading thread."""
        self.show_status(model=name, device="", note="loading…")
        # Only the conversation's ctx goes with the model: its sampling and reply length go
        # with each of its replies (_request), never to another conversation's.
        self.opened_ctx = self._ctx_for(self._own_settings())
        self.load_model(
            replace(self.options, ctx=self.opened_ctx).spec(name), leaving, self.conversation_id
        )

    def _own_settings(self) -> ConversationSettings:
        """The open conversation's own settings, else those the next message starts with."""
        if self.conversation_id is None:
            return self.new_settings
        return self.history.get(self.conversation_id).settings

    def _ctx_for(self, own: ConversationSettings) -> int | None:
        """The ctx to open the model with for a conversation's own settings: its own over the
        config's, under --ctx (as for_conversation decides); None: the model's."""
        return self.options.for_conversation(ConversationSettings(ctx=own.ctx)).ctx

    def reopen_model(self, name: str) -> bool:
        """Close the model and open `name` (Ctrl+L): the open conversation is left as a new
        chat leaves it, its cache saved, and loaded again into the new model once it is open
        (on_model_ready). False (and said) while a reply is written."""
        if self._busy():
            return False
        leaving, self.chat = self.chat, None
        self.start_loading(name, leaving)
        return True

    @work(thread=True, exclusive=True, group="model")
    def load_model(self, spec: ChatSpec, leaving: Chat | None, conversation: int | None) -> None:
        name = spec.model
        if leaving is not None:
            if conversation is not None:
                self._save_context(leaving, conversation)
            leaving.close()
        try:
            chat = self.backend.open_chat(spec)
        except Exception as error:  # shown in the app: a bad model must not kill it
            self.post_message(ModelFailed(name, _describe(error)))
            return
        self.post_message(ModelReady(name, chat))

    def on_model_ready(self, message: ModelReady) -> None:
        if self._closing_down():
            return
        self.chat, self.model_name = message.chat, message.name
        info = self.chat.info
        weights = f" {info.weight_format}" if info.weight_format else ""
        self.show_status(model=message.name, device=f"{info.device} {info.dtype}{weights}", note="")
        self.update_context_meter()
        if self.conversation_id is not None:  # opened (-c) while the model loaded
            self.switch_context(None, self.conversation_id)
        if not info.context_size:  # a remote whose server does not say (ollama's /v1)
            self.notify(
                f"the server of {message.name} does not say its context length: conversations"
                " go to it whole, and it may cut or refuse a long one",
                severity="warning",
                timeout=10,
            )

    def on_model_failed(self, message: ModelFailed) -> None:
        if self._closing_down():
            return
        self.show_status(model=message.name, device="", note="failed to load")
        self.notify(
            f"{message.name} failed to load: {message.reason}", severity="error", timeout=15
        )

    def on_resize(self, event: events.Resize) -> None:
        self.query_one(ConversationList).fit(event.size.width)

    # Conversations

    def action_toggle_sidebar(self) -> None:
        self.query_one(ConversationList).toggle()

    def refresh_conversations(self) -> None:
        self.query_one(ConversationList).show(self.history.conversations(), self.conversation_id)

    def open_conversation(self, conversation_id: int) -> None:
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
            return
        self._leave_for(conversation_id)
        self.conversation_id = conversation_id
        self._edit(None)
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
        self._leave_for(None)
        self.conversation_id = None
        self._edit(None)
        self.new_system = self.options.new_system
        self.new_settings = ConversationSettings()
        self.query_one(ChatView).show(None)
        self.query_one(ConversationList).highlighted = None
        self.update_context_meter()
        self.query_one(PromptInput).focus()

    # Sending and generating

    @on(PromptInput.Submitted)
    def send(self, event: PromptInput.Submitted) -> None:
        if self.chat is None:
            self.notify("the model is not loaded yet", severity="warning")
            return
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
            return
        try:
            question = self._record_question(event.text)
        except HistoryError as error:  # a full disk, say: the text stays in the editor
            self.notify(str(error), severity="error", timeout=15)
            return
        turn = UserTurn(event.text, question)
        turn.set_branch(self.history.siblings(question))  # an edited message: ‹2/2›
        self.query_one(ChatView).add(turn)
        self.query_one(PromptInput).clear()
        self.refresh_conversations()
        self.generate(question)

    def _record_question(self, text: str) -> int:
        """Save the message being sent (as a sibling of the one being edited, if any, which the
        history keeps), starting the conversation if none is open; returns its id."""
        view = self.query_one(ChatView)
        if self.editing is not None and self.conversation_id is not None:
            self.history.branch_from(self.editing)
            view.remove_from(self.editing)
            self._edit(None)
        if self.conversation_id is None:
            self.conversation_id = self.history.create(
                model=self.model_name, system_prompt=self.new_system
            )
            if self.new_settings.chosen():
                self.history.set_settings(self.conversation_id, self.new_settings)
            if self.new_system:
                view.show(self.history.get(self.conversation_id))
        return self.history.add_message(self.conversation_id, "user", text)

    def generate(self, question_id: int | None = None, continuing: ReplyTurn | None = None) -> None:
        """Start the reply to the conversation as the history holds it now; `continuing`: the
        last reply, stopped or cut, to go on with (its message grows)."""
        assert self.conversation_id is not None
        conversation = self.history.get(self.conversation_id)
        turns = [m for m in conversation.messages if m.role != "system"]
        messages = conversation.chat_messages()
        # chat_messages puts the latest system prompt first; index i of `messages` is turn i - 1.
        offset = len(messages) - len(turns)
        ids = [None] * offset + [m.id for m in turns]
        if continuing is None:
            self.reply_turn = ReplyTurn(status="streaming")
            self.query_one(ChatView).add(self.reply_turn)
        else:
            self.reply_turn = continuing
            self.continued_from = (continuing.status, continuing.finish_reason)
            continuing.set_status("streaming")
        self.stream = Markdown.get_stream(self.reply_turn)
        self.cancel = threading.Event()
        self.generating = True
        # The figures shown so far were the last reply's: none for this one yet.
        self.show_status(
            note="writing… (Esc stops)",
            time_to_first_token_ms=None,
            tokens_per_s=None,
            reused_tokens=None,
        )
        continued = continuing.message_id if continuing is not None else None
        request = self._request(conversation.settings, continuing is not None)
        self.run_reply(
            self.conversation_id, messages, ids, question_id, self.cancel, request, continued
        )

    def _request(self, own: ConversationSettings, continuing: bool) -> ReplyRequest:
        """A reply's settings: the conversation's own over the config's, under the flags."""
        if not own.chosen():
            return ReplyRequest(continue_reply=continuing)
        try:
            chosen = self.options.for_conversation(own)
        except OptionsError as error:  # a value the history holds that is out of range
            self.notify(f"{error}; the defaults are used", severity="warning")
            return ReplyRequest(continue_reply=continuing)
        return ReplyRequest(
            sampling=chosen.sampling, max_tokens=chosen.max_tokens, continue_reply=continuing
        )

    @work(thread=True, group="reply")
    def run_reply(
        self,
        conversation_id: int,
        messages: list[dict[str, str]],
        ids: list[int | None],
        question_id: int | None,
        cancel: threading.Event,
        request: ReplyRequest,
        continuing: int | None = None,
    ) -> None:
        assert self.chat is not None
        try:
            reply = self.chat.reply(messages, cancel=cancel, request=request)
        except PromptTooLongError as error:
            self.post_message(ReplyFailed(str(error), question_id))
            return
        try:
            recorder = ReplyRecorder(self.history, conversation_id, self.model_name, continuing)
        except HistoryError as error:  # a full disk: a continued reply cannot be reopened
            reply.cancel()
            for _ in reply:  # to its end, within a token: it holds the chat till then
                pass
            reason = f"the reply was not continued: {error}"
            self.post_message(ReplyFailed(reason, untouched=True))
            return
        unseen = {ids[i] for i in reply.dropped if ids[i] is not None}
        self.post_message(ReplyStarted(recorder.message_id, unseen, reply.prompt_tokens))
        unshown = UnshownText()
        try:
            for piece in recorded(reply, recorder):
                if unshown.add(piece):
                    self.post_message(ReplyPiece(unshown))
        except Exception as error:  # shown in the app; the conversation stays usable
            self.post_message(ReplyFailed(_describe(error)))
            return
        if recorder.save_error:  # a full disk: the reply was shown all the same
            self.call_from_thread(self.notify, recorder.save_error, severity="error", timeout=15)
        self.post_message(ReplyDone(reply.stats))

    def on_reply_started(self, message: ReplyStarted) -> None:
        if self._closing_down():
            return
        if self.reply_turn is not None:
            self.reply_turn.message_id = message.message_id
            if message.message_id is not None:  # None: the history could not give it a row
                self.reply_turn.set_branch(self.history.siblings(message.message_id))
        self.query_one(ChatView).mark_unseen(message.unseen)
        self.show_status(dropped=len(message.unseen), context_used=message.prompt_tokens)

    async def on_reply_piece(self, message: ReplyPiece) -> None:
        if self._closing_down():
            return
        text = message.unshown.take()
        if self.reply_turn is not None and self.stream is not None and text:
            self.reply_turn.text += text
            await self.stream.write(text)
            self.query_one(ChatView).settle()

    async def on_reply_done(self, message: ReplyDone) -> None:
        if self._closing_down():
            return
        stats = message.stats
        status = STATUS_BY_FINISH.get(stats.finish_reason or "", "complete")
        await self._end_reply(status, stats.finish_reason)
        self.show_status(
            context_used=stats.prompt_tokens + stats.generated_tokens,
            time_to_first_token_ms=stats.time_to_first_token_s * 1000,
            tokens_per_s=stats.decode_tokens_per_s,
            reused_tokens=stats.reused_tokens,
            note=marker(status, stats.finish_reason),
        )
        if stats.finish_reason == "context":
            self.notify(self._context_full_notice(), severity="warning", timeout=20)
        if self.conversation_id is not None and self.model_name:
            self.history.set_model(self.conversation_id, self.model_name)
        self.refresh_conversations()

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        if self._closing_down():
            return
        turn = self.reply_turn
        # A reply that could not be continued is shown as it was, to be continued later.
        await self._end_reply(*(self.continued_from if message.untouched else ("error",)))
        if message.question_id is not None and self.conversation_id is not None:
            # Nothing was answered (the message does not fit): take the question back, into
            # the editor, for the user to shorten.
            self._take_back(self.conversation_id, message.question_id)
            if turn is not None:
                turn.remove()
        self.show_status(note="")
        self.notify(message.reason, severity="error", timeout=15)

    def _take_back(self, conversation_id: int, question_id: int) -> None:
        view = self.query_one(ChatView)
        question = next((t for t in view.turns() if t.message_id == question_id), None)
        self.history.delete_from(conversation_id, question_id)
        view.remove_from(question_id)
        prompt = self.query_one(PromptInput)
        if isinstance(question, UserTurn) and not prompt.text:
            prompt.text = question.text
            prompt.move_cursor(prompt.document.end)
        conversation = self.history.get(conversation_id)
        if all(m.role == "system" for m in conversation.tree):
            # It was the first message: no conversation begins (nor keeps its title). On any
            # branch: an edited first message that was refused leaves the original.
            self.history.delete(conversation_id)
            self.conversation_id = None
            self.new_system = conversation.system_prompt
            self.refresh_conversations()

    def _context_full_notice(self) -> str:
        info = self.chat.info if self.chat is not None else None
        ctx = info.context_size if info is not None else 0
        most = info.context_length if info is not None else 0
        room = (
            f"; a larger --ctx (this model takes up to {most:,}) gives more room"
            if most > ctx
            else ""
        )
        return (
            f"The context is full ({ctx:,} tokens): the reply was cut. Ctrl+N starts a new "
            f"chat{room}; going on here leaves out the oldest turns."
        )

    async def _end_reply(self, status: str, finish_reason: str | None = None) -> None:
        if self.stream is not None:
            await self.stream.stop()
        if self.reply_turn is not None:
            self.reply_turn.set_status(status, finish_reason)
        self.query_one(ChatView).settle()
        self.stream = None
        self.generating = False

    def exit(self, *args: Any, **kwargs: Any) -> None:
        """Quitting stops the reply being written. The app's event loop waits for its worker
        threads when it closes, so it ends once the worker has saved what was written (as
        interrupted), within a token, not when the reply would have ended."""
        self.cancel.set()
        super().exit(*args, **kwargs)

    def on_unmount(self) -> None:
        self.cancel.set()  # however the app ends, the reply worker must not write on
        self._keep_context()

    # Instant resume: the KV cache of a conversation left is saved, and loaded when it is
    # opened again (Chat.save_context / restore_context; saving only where it pays).

    def _leave_for(self, opening: int | None) -> None:
        """The open conversation is left for `opening` (None: a new chat)."""
        leaving = self.conversation_id
        if self.chat is not None and (leaving, opening) != (None, None) and leaving != opening:
            self.switch_context(leaving, opening)

    @work(thread=True, group="context")
    def switch_context(self, leaving: int | None, opening: int | None) -> None:
        """Save the left conversation's cache, then load the opened one's: on a thread (a file
        of hundreds of MB); a reply sent meanwhile waits for it (the chat serves one at a
        time)."""
        chat = self.chat
        if chat is None:
            return
        if leaving is not None:
            self._save_context(chat, leaving)
        if opening is not None:
            chat.restore_context(str(opening))

    def _save_context(self, chat: Chat, conversation: int) -> None:
        """On a worker thread: save the conversation's cache, a failure said in a notice."""
        try:
            self._keep(chat, conversation)
        except OSError as error:  # a full disk: the conversation is only prefilled next time
            self.call_from_thread(
                self.notify, f"the KV cache was not saved: {error}", severity="warning"
            )

    def _keep(self, chat: Chat, conversation: int) -> None:
        """Save the conversation's cache (OSError when the disk refuses it), unless it was
        deleted meanwhile (F8 while it was saved, `history rm` elsewhere): checked after the
        write, so that a deletion after the check removes the file itself."""
        chat.save_context(str(conversation))
        if not self.history.exists(conversation):
            ContextFiles(self.home.kv).remove_key(str(conversation))

    def _keep_context(self) -> None:
        """Quitting: save the open conversation's cache, here, as the app closes."""
        if self.chat is not None and self.conversation_id is not None:
            try:
                self._keep(self.chat, self.conversation_id)
            except OSError:
                pass  # the app is gone; the next start prefills

    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()
        elif self.editing is not None:
            self._edit(None)
            self.query_one(PromptInput).clear()
        elif self.query_one(ChatView).has_focus:
            self.query_one(PromptInput).focus()  # out of the chat, back to the editor

    def action_regenerate(self) -> None:
        """Write the selected reply again (else the last), from the path before it; the one it
        replaces is kept as its sibling."""
        view = self.query_one(ChatView)
        turns = view.turns()
        target = self._selected(ReplyTurn)
        if target is None and turns and isinstance(turns[-1], ReplyTurn):
            target = turns[-1]
        if self.generating or self.chat is None or target is None:
            self.notify("nothing to regenerate", severity="warning")
            return
        if target.message_id is not None:
            self.history.branch_from(target.message_id)  # kept, as the new reply's sibling
            view.remove_from(target.message_id)
        else:
            target.remove()
        view.select(None)
        self.generate()

    def action_continue_reply(self) -> None:
        """Go on with the last reply where it stopped (Esc, the token limit, the context): the
        continuation is appended to the same message."""
        view = self.query_one(ChatView)
        turns = view.turns()
        target = self._selected(ReplyTurn) or view.last(ReplyTurn)
        if self._busy() or self.chat is None:
            return
        if not isinstance(target, ReplyTurn) or target.message_id is None:
            self.notify("no reply to continue", severity="warning")
        elif target is not turns[-1]:
            self.notify("only the conversation's last reply continues", severity="warning")
        elif target.status not in ("interrupted", "length"):
            self.notify("only a stopped or cut reply continues", severity="warning")
        elif not self.chat.info.continues_replies:
            self.notify(
                f"{self.model_name} cannot continue a reply here yet (a model on a remote"
                " server, or one served here with --max-batch 2 or more, can)",
                severity="warning",
            )
        else:
            view.select(None)
            self.generate(continuing=target)

    # The selected message: ↑/↓ in the chat, or a click

    def _selected(self, kind: type[Turn] = Turn) -> Turn | None:
        """The message selected in the chat, if it is a `kind`."""
        turn = self.query_one(ChatView).selected
        return turn if isinstance(turn, kind) and turn.message_id is not None else None

    def _busy(self) -> bool:
        """True (and said) while a reply is written: the path it continues must not change."""
        if self.generating:
            self.notify("a reply is being written: Esc stops it", severity="warning")
        return self.generating

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        # The cursor belongs to the chat: the editor or the list taking the focus ends it. A
        # dialog or the palette (another screen) does not: their action acts on it.
        view = self.query_one(ChatView)
        if event.widget is not view and event.widget.screen is view.screen:
            view.select(None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # F6 is a priority key (before the editor's): in a dialog, the dialog's widgets keep it.
        if action == "select_message" and self.screen is not self.screen_stack[0]:
            return False
        return True

    def action_select_message(self) -> None:
        self.query_one(ChatView).focus()  # the view selects the last message when it has none

    def action_edit_message(self) -> None:
        """Put the selected message (a user's; else the last) in the editor: sending it makes
        a sibling of it, and the reply follows that."""
        target = self._selected(UserTurn)
        if target is None and self._selected() is not None:
            self.notify("only your own messages can be edited", severity="warning")
            return
        if target is None:
            self.action_edit_last()
        else:
            self._start_editing(target)

    def action_branch(self, step: int) -> None:
        """Show the selected message's sibling `step` away (else the last reply's), that
        branch resumed where it was left: the path the model sees next."""
        view = self.query_one(ChatView)
        target = self._selected() or view.last(ReplyTurn)
        if self._busy() or target is None or target.message_id is None:
            return
        siblings = self.history.siblings(target.message_id)
        index = siblings.index + step
        if siblings.count < 2:
            self.notify("this message has no other branch", severity="warning")
            return
        if not 0 <= index < siblings.count:
            self.notify(f"this is the {'first' if step < 0 else 'last'} branch")
            return
        chosen = siblings.ids[index]
        self.history.activate(chosen)
        self._show_again(select=chosen if view.selected is not None else None)

    def action_delete_branch(self) -> None:
        view = self.query_one(ChatView)
        target = self._selected() or (view.turns() or [None])[-1]
        if self._busy() or target is None or target.message_id is None:
            self.notify("no message to delete", severity="warning")
            return
        message_id = target.message_id
        self.push_screen(
            ConfirmScreen("Delete this message and everything after it, on every branch?"),
            lambda yes: self._delete_branch(message_id, yes),
        )

    def _delete_branch(self, message_id: int, confirmed: bool | None) -> None:
        if not confirmed or self._busy():
            return
        self.history.delete_branch(message_id)
        self._show_again()

    def _show_again(self, select: int | None = None) -> None:
        """Show the open conversation's active path again, as the history holds it now."""
        if self.conversation_id is None:
            return
        self._edit(None)
        self.query_one(ChatView).show(self.history.get(self.conversation_id), select=select)
        self.refresh_conversations()
        self.update_context_meter()

    def on_key(self, event) -> None:
        """PageUp/PageDown in the editor scroll the chat; typing in the chat pane goes to the
        editor."""
        prompt = self.query_one(PromptInput)
        chat = self.query_one(ChatView)
        if event.key in ("pageup", "pagedown") and prompt.has_focus:
            # prevent_default: the editor's own PageUp binding would move its cursor too.
            event.stop()
            event.prevent_default()
            if event.key == "pageup":
                chat.scroll_page_up(animate=False)
            else:
                chat.scroll_page_down(animate=False)
        elif event.is_printable and chat.has_focus:
            event.stop()
            event.prevent_default()
            prompt.focus()
            prompt.insert(event.character or "")

    @on(PromptInput.EditLast)
    def action_edit_last(self) -> None:
        last = self.query_one(ChatView).last(UserTurn)
        if isinstance(last, UserTurn):
            self._start_editing(last)

    def _start_editing(self, turn: UserTurn) -> None:
        if turn.message_id is None or self.generating:
            return
        self._edit(turn.message_id)
        prompt = self.query_one(PromptInput)
        prompt.edit_message(turn.text)
        prompt.focus()

    def _edit(self, message_id: int | None) -> None:
        """Start (or with None, end) editing the user message `message_id`, marked in the view."""
        self.editing = message_id
        for turn in self.query_one(ChatView).turns():
            turn.set_class(message_id is not None and turn.message_id == message_id, "editing")
        if message_id is None:
            self.query_one(PromptInput).end_editing()

    # System prompt and model

    def action_system_prompt(self) -> None:
        screen = SystemPromptScreen(self.history, self._system_prompt())
        self.push_screen(screen, self._apply_system_prompt)

    def _apply_system_prompt(self, choice: PromptChoice | None) -> None:
        if choice is None:
            return
        if self.conversation_id is None:
            self.new_system = choice.prompt or None
            self.query_one(ChatView).add(SystemNote(choice.prompt))
            return
        message_id = self.history.set_system_prompt(self.conversation_id, choice.prompt)
        self.query_one(ChatView).add(SystemNote(choice.prompt, message_id))

    def action_conversation_settings(self) -> None:
        self.list_models(for_settings=True)  # its model field offers what Ctrl+L offers

    def _open_settings(self, models: list[tuple[str, str]]) -> None:
        most = self.chat.info.context_length if self.chat is not None else 0
        panel = ConversationSettingsScreen(
            self._own_settings(), self.model_name, models, self._system_prompt(), most
        )
        self.push_screen(panel, self._apply_settings)

    def _apply_settings(self, choice: PanelChoice | None) -> None:
        if choice is None:
            return
        settings = choice.settings
        ctx = self._ctx_for(settings)
        model = choice.model or self.model_name
        reopen = model is not None and (model != self.model_name or ctx != self.opened_ctx)
        if reopen and self._busy():  # nothing is kept: the model must not change under a reply
            return
        if self.conversation_id is None:
            self.new_settings = settings  # given to the conversation the next message starts
        else:
            self.history.set_settings(self.conversation_id, settings)
        if choice.system_prompt != (self._system_prompt() or ""):
            self._apply_system_prompt(PromptChoice(choice.system_prompt))
        if reopen:
            assert model is not None
            self._switch_model(model, again=True)
        said = settings.described() or "the defaults"
        flagged = sorted(k for k in settings.chosen() if k in self.options.flagged)
        if flagged:  # the command line's flags win over a conversation's own
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in flagged)
            said += f" ({flags} given: the flag wins)"
        self.notify(f"this conversation: {said}")

    def _system_prompt(self) -> str | None:
        if self.conversation_id is None:
            return self.new_system
        return self.history.get(self.conversation_id).system_prompt

    def action_pick_model(self) -> None:
        self.list_models()  # a remote may take seconds to answer: not on the event loop

    @work(thread=True, exclusive=True, group="listing")
    def list_models(self, for_settings: bool = False) -> None:
        found = self.backend.models()
        self.post_message(ModelsListed(found, dict(self.backend.unreachable), for_settings))

    def on_models_listed(self, message: ModelsListed) -> None:
        if self._closing_down():
            return
        for name, why in message.unreachable.items():
            self.notify(f"{name}'s models are not listed: {why}", severity="warning", timeout=10)
        choices = [(m.name, f"{m.name} ({m.description})") for m in message.models]
        if message.for_settings:
            self._open_settings(choices)
            return
        if not choices:
            self.notify("no models installed: run `llamachat pull smollm2`", severity="error")
            return
        self.push_screen(PickScreen("Switch model", choices, self.model_name), self._switch_model)

    def _switch_model(self, name: str | None, again: bool = False) -> None:
        """Open model `name` for the conversation (Ctrl+L; the panel's model or ctx, `again`
        when it is the open one, its context changed)."""
        if name is None or (name == self.model_name and not again):
            return
        if not self.reopen_model(name):
            return
        if self.conversation_id is not None:
            self.history.set_model(self.conversation_id, name)

    # Search, rename, delete, export, copy

    def action_search(self) -> None:
        self.push_screen(SearchScreen(self.history), self._open_found)

    def _open_found(self, found: Found | None) -> None:
        if found is not None:
            if not self.generating:  # a hit on another branch: that branch is opened
                self.history.activate(found.message_id)
            self.open_conversation(found.conversation_id)
            if self.conversation_id == found.conversation_id:
                self.query_one(ChatView).reveal(found.message_id)

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
        if conversation_id == self.conversation_id and self._busy():  # its reply is recorded
            return
        self.history.delete(conversation_id)
        # Its saved KV caches go with it, as `history rm` removes them (no torch needed).
        ContextFiles(self.home.kv).remove_key(str(conversation_id))
        if conversation_id == self.conversation_id:
            self.conversation_id = None  # not left but gone: nothing of it is saved
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
        try:
            configured = load_settings(self.home.config_file).export_dir
        except SettingsError as error:
            self.notify(f"cannot export: {error}", severity="error", timeout=15)
            return
        folder = Path.cwd() / Path(configured or ".").expanduser()
        try:
            path = _write_new(folder, f"llamachat-{conversation.id}", kind, text)
        except OSError as error:
            reason = error.strerror or str(error)
            self.notify(f"cannot export to {folder}: {reason}", severity="error", timeout=15)
            return
        self.notify(f"exported to {path}")

    def action_copy_reply(self) -> None:
        """Copy the selected message (else the last reply), through the terminal (OSC 52)."""
        selected = self._selected()
        target = selected or self.query_one(ChatView).last(ReplyTurn)
        text = getattr(target, "text", "")
        if not text:
            self.notify("no reply to copy", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify("message copied" if selected is not None else "reply copied")

    def action_copy_code(self) -> None:
        selected = self._selected(ReplyTurn)
        target = selected or self.query_one(ChatView).last(ReplyTurn)
        blocks = _CODE_BLOCK.findall(target.text) if isinstance(target, ReplyTurn) else []
        if not blocks:
            which = "the selected reply" if selected is not None else "the last reply"
            self.notify(f"{which} has no code block", severity="warning")
            return
        self.copy_to_clipboard(blocks[-1])
        self.notify("code block copied")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(help_rows()))

    # Status bar

    def show_status(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        self.query_one(StatusBar).show(self.status)

    def update_context_meter(self) -> None:
        if self.chat is None:
            return
        messages = (
            self.history.get(self.conversation_id).chat_messages() if self.conversation_id else []
        )
        use = self.chat.context_use(messages)
        self.show_status(context_used=use.used, context_size=use.window, dropped=0)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if "out of memory" in text.lower():
        hint = "out of GPU memory: start with a smaller --ctx, or pick a smaller model"
        return f"{text.splitlines()[0]} — {hint}"
    return text.splitlines()[0]


def _write_new(folder: Path, stem: str, suffix: str, text: str) -> Path:
    """Write `text` to folder/STEM.SUFFIX, else STEM-2.SUFFIX, -3…: never over an earlier file
    (an export the user kept, perhaps edited). Private, as the history is."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for number in itertools.count(1):
        path = folder / (f"{stem}.{suffix}" if number == 1 else f"{stem}-{number}.{suffix}")
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(text)
        except BaseException:
            path.unlink(missing_ok=True)  # no half-written export left behind (a full disk)
            raise
        return path
    raise AssertionError("unreachable")


def make_app(
    home: Home, options: ChatOptions, app_class: type[LlamaChatApp] = LlamaChatApp
) -> LlamaChatApp:
    """The app on `home`'s history, models and config: how the CLI and the tests build it (a
    test's subclass of the app as `app_class`)."""
    settings = load_settings(home.config_file)
    router = Router(
        ModelStore(home.models),
        remotes.load(home.remotes_file),
        None if options.in_process else home.runtime,
        ContextFiles(home.kv, settings.kv_disk_budget_bytes),
    )
    return app_class(
        home,
        options,
        history=HistoryStore(home.history_db),
        backend=router,
        settings=settings,
    )
