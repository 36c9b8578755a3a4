"""What the worker threads tell the app. Workers only post these; they never touch widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from ..models.reply_defaults import ReplyDefaults


@dataclass
class ModelReady(Message):
    name: str
    model: Any  # engine.ChatModel
    session: Any  # engine.ChatSession
    defaults: ReplyDefaults  # the model's advice for what the options leave open


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
    text: str


@dataclass
class ReplyDone(Message):
    stats: Any  # engine.ReplyStats


@dataclass
class ReplyFailed(Message):
    reason: str
    question_id: int | None = None  # the turn to take back when nothing could be answered
