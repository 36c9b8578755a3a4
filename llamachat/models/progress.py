"""How long-running store work reports progress, without knowing who draws it (the CLI uses
rich bars on stderr; tests and library callers pass nothing)."""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def update(self, completed: int) -> None: ...

    def finish(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Task: ...

    def note(self, message: str) -> None: ...


class _SilentTask:
    def update(self, completed: int) -> None:
        pass

    def finish(self) -> None:
        pass


class SilentProgress:
    def task(self, description: str, total: int | None) -> Task:
        return _SilentTask()

    def note(self, message: str) -> None:
        pass
