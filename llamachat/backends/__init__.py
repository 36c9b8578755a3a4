"""How front ends reach models: the interface (base.py) and its implementations (local.py: the
engine in this process). Nothing here imports torch until a local chat opens."""

from .base import (
    Backend,
    BackendError,
    Chat,
    ChatInfo,
    ChatLoad,
    ChatMessage,
    ChatSpec,
    ContextUse,
    FinishReason,
    Logprob,
    ModelInfo,
    ModelUnavailableError,
    PromptTooLongError,
    Reply,
    ReplyRequest,
    ReplyStats,
    Sampling,
    TokenLogprob,
)

__all__ = [
    "Backend",
    "BackendError",
    "Chat",
    "ChatInfo",
    "ChatLoad",
    "ChatMessage",
    "ChatSpec",
    "ContextUse",
    "FinishReason",
    "Logprob",
    "ModelInfo",
    "ModelUnavailableError",
    "PromptTooLongError",
    "Reply",
    "ReplyRequest",
    "ReplyStats",
    "Sampling",
    "TokenLogprob",
]
