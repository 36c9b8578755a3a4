"""Streaming a reply to its reader and to the history at once. Every front end (the one-shot
answer, the line chat, the chat app) passes its replies through here, so they share one history."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .store import MessageStats, ReplyRecorder

if TYPE_CHECKING:
    from ..backends.base import Reply, ReplyStats

# How a backend ended a reply → the status it is kept with.
STATUS_BY_FINISH = {
    "stop": "complete",
    "length": "length",  # the token limit
    "context": "length",  # the context window is full
    "cancelled": "interrupted",
}
# Why a reply kept as "length" stopped, in words, by its finish reason.
CUT_BY = {"length": "token limit", "context": "context full"}


def history_stats(stats: ReplyStats, finish_reason: str | None) -> MessageStats:
    return MessageStats(
        prompt_tokens=stats.prompt_tokens,
        reused_tokens=stats.reused_tokens,
        generated_tokens=stats.generated_tokens,
        time_to_first_token_ms=stats.time_to_first_token_s * 1000,
        tokens_per_s=stats.decode_tokens_per_s,
        finish_reason=finish_reason,
    )


def recorded(reply: Reply, recorder: ReplyRecorder) -> Iterator[str]:
    """The reply's pieces, each also saved. The message ends as STATUS_BY_FINISH says for the
    backend's finish reason (kept with it), interrupted when the reader stopped early (Ctrl+C, a
    closed pipe) and error on an exception; those two have no finish reason."""
    status, finish_reason = "interrupted", None
    try:
        for piece in reply:
            recorder.append(piece)
            yield piece
        finish_reason = reply.stats.finish_reason
        status = STATUS_BY_FINISH.get(finish_reason or "", "complete")
    except Exception:
        status = "error"
        raise
    finally:
        recorder.finish(status, history_stats(reply.stats, finish_reason))
