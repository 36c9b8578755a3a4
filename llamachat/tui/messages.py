"""What the worker threads tell the app. Workers only post these; they never touch widgets."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from textual.message import Message

from ..backends.base import Chat, ModelInfo, ReplyStats


@dataclass
class UnshownText:
    """What the reply's worker has written and the app has not shown yet. The worker posts a
    ReplyPiece only when the last one was taken, so the app's queue never holds more than one
    however fast the model writes, and a key (Esc) waits behind one piece, not hundreds."""

    _pieces: list[str] = field(default_factory=list)
    _posted: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, piece: str) -> bool:
        """Keep `piece`; True when a ReplyPiece must be posted for it."""
        with self._lock:
            self._pieces.append(piece)
            posted, self._posted = self._posted, True
            return not posted

    def take(self) -> str:
        with self._lock:
            text = "".join(self._pieces)
            self._pieces.clear()
            self._posted = False
            return text


@dataclass
class ModelsListed(Message):
    """The models to pick from: installed and on the remotes, and why a remote has none."""

    models: list[ModelInfo]
    unreachable: dict[str, str]
    for_settings: bool = False  # for the Ctrl+O panel's model field; else for Ctrl+L's picker


@dataclass
class ModelReady(Message):
    name: str
    chat: Chat


@dataclass
class ModelFailed(Message):
    name: str
    reason: str


@dataclass
class ReplyStarted(Message):
    message_id: int
    unseen: set[int]  # messages left out to fit the context
    prompt_tokens: int


@dataclass
class ReplyPiece(Message):
    """Text waiting in `unshown`: take it all when handling this."""

    unshown: UnshownText


@dataclass
class ReplyDone(Message):
    stats: ReplyStats


@dataclass
class ReplyFailed(Message):
    reason: str
    question_id: int | None = None  # the turn to take back when nothing could be answered
    untouched: bool = False  # a reply to continue that the history could not reopen
