"""The `llamachat serve` processes running on this machine: each records itself in the runtime
folder (Home.runtime) once it listens, and takes its record away when it stops, so that a
one-shot, `-c` and the chat app find a model already loaded instead of loading it again, and
`llamachat ps` can say what is loaded.

A record is `server-PID.json`, 0600 in a 0700 folder:

    {"pid": 4242, "started": "…", "url": "http://127.0.0.1:8000/v1", "key": false,
     "log": "/run/user/1000/llamachat/server-4242.log" or null,
     "models": [{"name": "smollm2", "device": "cpu", "dtype": "float32",
                 "weight_format": "q4_1", "context_size": 8192}]}

A killed server leaves its record behind: one whose process no longer runs is not a server
(and is deleted when read). Nothing in a record becomes a path or a URL unchecked: the URL must
be plain http to a loopback address, the models' names are installed models' names.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .private import private_dir, write_private
from .processes import own_start, process_running

_RECORD = re.compile(r"server-(\d{1,10})\.json")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    device: str
    dtype: str
    weight_format: str | None
    context_size: int


@dataclass(frozen=True)
class RunningServer:
    pid: int
    url: str  # the API's base, ending in /v1
    key: bool  # whether it asks for an API key (LLAMACHAT_API_KEY)
    models: tuple[LoadedModel, ...]
    log: str | None  # where a background server writes its log; None: its own terminal

    def serves(self, model: str) -> bool:
        return any(loaded.name == model for loaded in self.models)


def record(folder: Path, url: str, models: list[LoadedModel], key: bool, log: Path | None) -> Path:
    """Say that this process serves `models` at `url`; returns the record's path (for
    `forget`)."""
    path = private_dir(folder) / f"server-{os.getpid()}.json"
    data = {
        "pid": os.getpid(),
        "started": own_start(),
        "url": url,
        "key": key,
        "log": str(log) if log else None,
        "models": [asdict(model) for model in models],
    }
    write_private(path, json.dumps(data, indent=1).encode())
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def running(folder: Path) -> list[RunningServer]:
    """The servers whose records are in `folder` and whose processes still run, oldest pid
    first; a record left by a process that is gone is deleted."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    servers = []
    for name in names:
        if not _RECORD.fullmatch(name):
            continue
        path = folder / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written (it is replaced whole) or not ours to read
        server = _parsed(data)
        if server is None:
            continue
        if not process_running(server.pid, data.get("started")):
            forget(path)
            continue
        servers.append(server)
    return sorted(servers, key=lambda server: server.pid)


def loopback_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a server listening on host:port at."""
    if host in ("0.0.0.0", "::", "localhost", ""):
        host = "127.0.0.1"
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def _parsed(data: object) -> RunningServer | None:
    """A record as a RunningServer, or None for one that is not what `record` writes."""
    if not isinstance(data, dict):
        return None
    pid, url, models = data.get("pid"), data.get("url"), data.get("models")
    if not (isinstance(pid, int) and pid > 0 and isinstance(url, str) and _is_local(url)):
        return None
    if not isinstance(models, list):
        return None
    loaded = []
    for model in models:
        try:
            loaded.append(LoadedModel(**model))
        except TypeError:
            return None
        if not all(isinstance(v, str | int | None) for v in asdict(loaded[-1]).values()):
            return None
    log = data.get("log")
    return RunningServer(
        pid=pid,
        url=url,
        key=data.get("key") is True,
        models=tuple(loaded),
        log=log if isinstance(log, str) else None,
    )


def _is_local(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = ipaddress.ip_address(parts.hostname or "")
        parts.port  # noqa: B018 - read for its check
    except ValueError:
        return False
    return parts.scheme == "http" and host.is_loopback and parts.path == "/v1"
