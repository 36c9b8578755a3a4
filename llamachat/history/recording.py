"""Streaming a reply to its reader and to the history at once. Every front end (the one-shot
answer, the line chat, the chat app) passes its replies through here, so they share one history."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .store import ReplyRecorder, ReplyStats


class _EngineStats(Protocol):
    prompt_tokens: int
    reused_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    finish_reason: str | None


class _EngineReply(Protocol):
    stats: _EngineStats

    def __iter__(self) -> Iterator[str]: ...


def history_stats(stats: _EngineStats) -> ReplyStats:
    return ReplyStats(
        prompt_tokens=stats.prompt_tokens,
        reused_tokens=stats.reused_tokens,
        generated_tokens=stats.generated_tokens,
        time_to_first_token_ms=stats.time_to_first_token_s * 1000,
        tokens_per_s=stats.decode_tokens_per_s,
    )


def recorded(reply: _EngineReply, recorder: ReplyRecorder) -> Iterator[str]:
    """The reply's pieces, each also saved; the message ends complete, interrupted (cancelled,
    Ctrl+C, or the reader stopped early) or error (an exception)."""
    status = "interrupted"
    try:
        for piece in reply:
            recorder.append(piece)
            yield piece
        status = "interrupted" if reply.stats.finish_reason == "cancelled" else "complete"
    except Exception:
        status = "error"
        raise
    finally:
        recorder.finish(status, history_stats(reply.stats))
