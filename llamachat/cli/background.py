"""`llamachat serve --background`, `llamachat ps` and `llamachat stop`: a server kept running
with its models loaded, as ollama's daemon keeps them, found through the records that running
servers leave in the runtime folder (serving.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..home import Home
from ..private import private_dir
from ..processes import pid_alive
from ..serving import RunningServer, running
from .console import CliError, stderr, stdout

START_TIMEOUT_S = 600  # loading a large model from a slow disk takes minutes
STOP_TIMEOUT_S = 20  # serve gives in-flight replies 10 s, then its engine stops


def log_path(home: Home, pid: int) -> Path:
    """Where the background server `pid` writes what it would have said on its terminal."""
    return home.runtime / f"server-{pid}.log"


def start_in_background(home: Home, flags: list[str], api_key: str | None) -> int:
    """Start `llamachat serve FLAGS` in a session of its own, its stderr in its log, and return
    once it serves (its record is there) or has failed (its last line says why)."""
    folder = private_dir(home.runtime)

    def own_log() -> None:  # in the child, before it runs Python: its stderr goes to its log
        descriptor = os.open(
            log_path(home, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        os.dup2(descriptor, 2)
        os.close(descriptor)

    env = {key: value for key, value in os.environ.items() if key != "LLAMACHAT_API_KEY"}
    if api_key:
        env["LLAMACHAT_API_KEY"] = api_key
    child = subprocess.Popen(  # noqa: S603 - our own command, its flags from serve's own
        [sys.executable, "-m", "llamachat", "serve", *flags, "--detached"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl+C on this terminal, or closing it, leaves it running
        preexec_fn=own_log,  # noqa: PLW1509 - this process runs no other thread yet
        env=env,
    )
    log = log_path(home, child.pid)
    stderr.print(f"llamachat: starting a server in the background (log: {log})…", markup=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        server = next((s for s in running(folder) if s.pid == child.pid), None)
        if server is not None:
            names = ", ".join(model.name for model in server.models)
            stderr.print(
                f"llamachat: serving {names} at {server.url} (pid {server.pid});"
                " `llamachat stop` stops it",
                markup=False,
            )
            return 0
        if child.poll() is not None:
            raise CliError(_last_words(log) or f"the server exited with status {child.returncode}")
        time.sleep(0.1)
    raise CliError(f"the server did not start within {START_TIMEOUT_S} s; see {log}")


def ps(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the models loaded by llamachat servers on this machine."""
    servers = running(Home.current().runtime)
    if as_json:
        print(json.dumps([_entry(server) for server in servers], indent=2))
        return
    if not servers:
        stderr.print("no llamachat server is running (start one: llamachat serve --background)")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "SERVER", "PID", "DEVICE", "CONTEXT"):
        table.add_column(column, no_wrap=True)
    for server in servers:
        for model in server.models:
            cells = (
                model.name,
                server.url + (" (key)" if server.key else ""),
                str(server.pid),
                " ".join(filter(None, (model.device, model.dtype, model.weight_format))),
                f"{model.context_size}",
            )
            table.add_row(*(Text(cell) for cell in cells))  # as written, never as markup
    stdout.print(table)


def stop(
    model: Annotated[
        str | None,
        typer.Argument(help="Stop the server(s) serving this model. [default: every one]"),
    ] = None,
) -> None:
    """Stop llamachat servers running on this machine (as Ctrl+C would: replies in flight are
    given a few seconds to end)."""
    servers = running(Home.current().runtime)
    chosen = [server for server in servers if model is None or server.serves(model)]
    if not chosen:
        what = f" serving {model}" if model else ""
        raise CliError(f"no llamachat server{what} is running")
    for server in chosen:
        try:
            os.kill(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(pid_alive(s.pid) for s in chosen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [str(s.pid) for s in chosen if pid_alive(s.pid)]
    if left:
        raise CliError(f"server {', '.join(left)} did not stop within {STOP_TIMEOUT_S} s")
    for server in chosen:
        stderr.print(
            f"llamachat: stopped the server at {server.url} (pid {server.pid})", markup=False
        )


def _entry(server: RunningServer) -> dict:
    return {
        "pid": server.pid,
        "url": server.url,
        "key": server.key,
        "log": server.log,
        "models": [model.__dict__ for model in server.models],
    }


def _last_words(log: Path) -> str | None:
    """The last line a failed server wrote, its own prefix taken off (CliError adds it)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return None
    if not lines:
        return None
    return lines[-1].removeprefix("llamachat: error: ").strip()
