"""Rich progress bars on stderr for the store's long work: bytes, speed, time left."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .console import stderr


class _BarTask:
    def __init__(self, bars: Progress, task: TaskID):
        self._bars = bars
        self._task = task

    def update(self, completed: int) -> None:
        self._bars.update(self._task, completed=completed)

    def finish(self) -> None:
        total = self._bars.tasks[self._task].total
        if total is not None:
            self._bars.update(self._task, completed=total)
        self._bars.stop_task(self._task)


class RichProgress:
    """A models.progress.Progress drawn with rich; use as a context manager around the work."""

    def __init__(self) -> None:
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
        )
        self._started = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            self._bars.stop()

    def task(self, description: str, total: int | None) -> _BarTask:
        self._start()
        return _BarTask(self._bars, self._bars.add_task(description, total=total))

    def note(self, message: str) -> None:
        self._bars.console.print(message, markup=False)

    def _start(self) -> None:
        # Started on the first bar only: a pull that fails at once prints its error alone.
        if not self._started:
            self._bars.start()
            self._started = True
