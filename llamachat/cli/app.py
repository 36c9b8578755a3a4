"""The `llamachat` command: the commands, and every error mapped to an exit code in one place.

Exit codes: 0 done; 1 failed (the message says what to do); 2 bad usage or input;
130 interrupted (Ctrl+C); 141 output pipe closed early.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from ..backends.base import BackendError
from ..chat_options import OptionsError
from ..engine.errors import EngineError
from ..history.db import HistoryError
from ..home import Home
from ..models.errors import StoreError
from ..remotes import RemoteError
from ..settings import SettingsError
from . import (
    background,
    bench,
    cache_cmd,
    config_cmd,
    create_cmd,
    history_cmd,
    models,
    remote_cmd,
    serve,
)
from .console import CliError, error_line, one_line_warning, stdin_is_terminal
from .options import GenerationOptions, generation_options, given_options, with_earlier

ThemeOption = Annotated[
    str | None, typer.Option("--theme", help="Chat app theme (remembered once chosen in the app).")
]


class OutputClosed(Exception):
    """stdout's reader went away (`llamachat ask … | head -c 20`). Deliberately not an OSError:
    click turns a BrokenPipeError into exit 1 before main() could give it its own code, 141."""


class _Commands(TyperGroup):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise OutputClosed from None


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version  # 30 ms to import, for this flag alone

        print(f"llamachat {version('llamachat')}")
        raise typer.Exit()


app = typer.Typer(
    cls=_Commands,
    name="llamachat",
    help="Chat with local LLaMA-family models. Pipe a question in for a one-shot answer.",
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
app.command("pull")(models.pull)
app.command("list")(models.list_models)
app.command("show")(models.show)
app.command("verify")(models.verify)
app.command("rm")(models.rm)
app.command("create")(create_cmd.create)
app.command("bench")(bench.bench)
app.command("serve")(serve.serve)
app.command("ps")(background.ps)
app.command("stop")(background.stop)
app.add_typer(config_cmd.app, name="config")
app.add_typer(history_cmd.app, name="history")
app.add_typer(cache_cmd.app, name="cache")
app.add_typer(remote_cmd.app, name="remote")


@app.callback(invoke_without_command=True)
@generation_options
def root(
    context: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show a traceback when something fails.")
    ] = False,
    theme: ThemeOption = None,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
    *,
    options: GenerationOptions,
) -> None:
    """With stdin piped: answer it on stdout. On a terminal: chat."""
    if context.invoked_subcommand is not None:
        # `llamachat -m NAME ask …`: what came before the command applies to it, under its own
        # flags; a command that generates nothing must not take them silently.
        given = given_options(options)
        if given and context.invoked_subcommand not in ("ask", "chat"):
            raise CliError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for answering and"
                f" chatting (ask, chat), not for `llamachat {context.invoked_subcommand}`",
                exit_code=2,
            )
        context.obj = options
        return
    if stdin_is_terminal():
        open_chat_app(options, theme)
    else:
        from .answer import answer

        answer(None, options)


@app.command("ask")
@generation_options
def ask(
    context: typer.Context,
    prompt: Annotated[
        str | None, typer.Argument(help="The question; piped stdin is appended after it.")
    ] = None,
    *,
    options: GenerationOptions,
) -> None:
    """Answer one question on stdout and exit."""
    from .answer import answer

    answer(prompt, with_earlier(options, context.obj))


@app.command("chat")
@generation_options
def chat_command(
    context: typer.Context,
    plain: Annotated[
        bool, typer.Option("--plain", help="A line-by-line chat instead of the full-screen app.")
    ] = False,
    theme: ThemeOption = None,
    *,
    options: GenerationOptions,
) -> None:
    """Chat on the terminal: the full-screen app, or --plain for a line-by-line chat."""
    options = with_earlier(options, context.obj)
    from .chat import chat, ensure_terminal

    ensure_terminal()
    if plain:
        chat(options)
    else:
        open_chat_app(options, theme)


def open_chat_app(options: GenerationOptions, theme: str | None) -> None:
    # The one place the command line reaches into the chat app, to start it.
    from ..tui import run
    from .generation import app_options

    run(app_options(options, theme))


def _not_utf8(args: list[str]) -> int | None:
    """The index of the first argument whose bytes were not UTF-8 (Python keeps them as lone
    surrogates, which every later encode would choke on), else None."""
    for index, arg in enumerate(args):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return index
    return None


def main(argv: list[str] | None = None) -> int:
    """The command on `argv`, or on the process's own arguments; its exit code. Run as the
    process's command (no `argv`), a command that loaded PyTorch ends the process itself."""
    code = _run(list(sys.argv[1:] if argv is None else argv))
    if argv is None and "torch" in sys.modules:
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> None:
    # PyTorch's share of the interpreter's teardown takes ~0.5 s (a piped answer's exit, which
    # `answer=$(... | llamachat)` waits for). Every store is committed and every reply written
    # by now; the exit handlers (tensor-parallel ranks are stopped by one) still run.
    import atexit

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # the reader went away, or stdout is closed
        code = code or 141
    atexit._run_exitfuncs()
    os._exit(code)


def _run(args: list[str]) -> int:
    # --debug works anywhere on the line, so it is taken out before the parser sees it.
    debug = "--debug" in args or os.environ.get("LLAMACHAT_DEBUG") == "1"
    args = [arg for arg in args if arg != "--debug"]
    if not debug:
        warnings.formatwarning = one_line_warning
    if (undecodable := _not_utf8(args)) is not None:
        error_line(
            f"argument {undecodable + 1} is not valid UTF-8 ({os.fsencode(args[undecodable])!r});"
            " llamachat reads its arguments as UTF-8 text"
        )
        return 2
    command = typer.main.get_command(app)
    try:
        # GPU kernels compiled by Triton are kept with llamachat's other caches (Triton's own
        # default is ~/.triton), so a second start skips compiling them.
        os.environ.setdefault("TRITON_CACHE_DIR", str(Home.current().cache / "triton"))
        result = command.main(args=args, prog_name="llamachat", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.TyperException as error:  # usage errors: a bad option, a missing argument
        error_line(f"{error.format_message()} (see llamachat --help)")
        return error.exit_code
    except (
        CliError,
        OptionsError,
        BackendError,
        StoreError,
        EngineError,
        SettingsError,
        HistoryError,
        RemoteError,
    ) as error:
        if debug:
            traceback.print_exc()
        error_line(str(error))
        return getattr(error, "exit_code", 1)
    except (KeyboardInterrupt, typer.Abort):
        print(file=sys.stderr)
        return 130
    except (OutputClosed, BrokenPipeError):
        # The reader went away (`llamachat list | head -1`): stop quietly.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 141
    except OSError as error:  # the disk is full, a folder is not writable...
        if debug:
            traceback.print_exc()
        where = f": {error.filename}" if error.filename else ""
        error_line(f"{error.strerror or error}{where}")
        return 1
    except Exception as error:
        if debug:
            traceback.print_exc()
        else:
            error_line(f"{type(error).__name__}: {error} (run with --debug for a traceback)")
        return 1
