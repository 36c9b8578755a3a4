"""One line under the editor: model, device, how full the context is, and the last reply's speed."""

from __future__ import annotations

from dataclasses import dataclass

from textual.widgets import Static

WARN_AT = 0.9  # the meter turns to a warning from this fraction of the context


@dataclass(frozen=True)
class Status:
    model: str = "no model"
    device: str = ""
    context_used: int = 0
    context_size: int = 0
    dropped: int = 0
    time_to_first_token_ms: float | None = None
    tokens_per_s: float | None = None
    reused_tokens: int | None = None
    note: str = ""


class StatusBar(Static):
    def show(self, status: Status) -> None:
        parts = [status.model]
        if status.device:
            parts.append(status.device)
        if status.context_size:
            parts.append(_meter(status.context_used, status.context_size))
        if status.dropped:
            parts.append(f"{status.dropped} oldest messages unseen")
        if status.time_to_first_token_ms is not None:
            parts.append(f"TTFT {status.time_to_first_token_ms:.0f} ms")
        if status.tokens_per_s:
            parts.append(f"{status.tokens_per_s:.1f} tok/s")
        if status.reused_tokens is not None:
            parts.append(f"reused {status.reused_tokens}")
        if status.note:
            parts.append(status.note)
        full = status.context_size and (
            status.dropped or status.context_used >= WARN_AT * status.context_size
        )
        self.set_class(bool(full), "warning")
        self.update(" · ".join(parts))


def _meter(used: int, size: int, width: int = 10) -> str:
    filled = min(width, round(width * used / size))
    return f"ctx {used}/{size} " + "█" * filled + "░" * (width - filled)
