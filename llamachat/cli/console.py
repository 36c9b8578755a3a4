"""Where output goes: answers and requested data on stdout, everything else on stderr."""

from __future__ import annotations

import errno
import sys

from rich.console import Console


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich exits with 1 here; the command line exits with 141 (see app.main).
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the output pipe was closed")


# Off a terminal (`show NAME > file`, `pull --list | less`) there is no width to fit: Rich would
# take the terminal's or 80 columns and cut table cells, so tables get all the width they need.
UNLIMITED_WIDTH = 100_000


def _width_for(stream: object) -> int | None:
    isatty = getattr(stream, "isatty", None)
    return None if isatty is not None and isatty() else UNLIMITED_WIDTH


stdout = _Console(highlight=False, soft_wrap=True, width=_width_for(sys.stdout))
stderr = _Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """A failure the user can act on; `exit_code` 1 for failures, 2 for bad usage or input."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def warn(message: str) -> None:
    stderr.print(f"llamachat: warning: {message}", markup=False)


def error_line(message: str) -> None:
    stderr.print(f"llamachat: error: {message}", markup=False)


def one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line=None
) -> str:
    """Python's warnings as the command line shows them: one line, without the source file and
    line that Python adds (--debug keeps its format)."""
    text = str(message)
    return f"{text}\n" if text.startswith("llamachat: ") else f"llamachat: warning: {text}\n"


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()
