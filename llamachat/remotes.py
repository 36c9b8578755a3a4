"""The OpenAI-compatible servers the user chats with (`llamachat remote add`), by name, kept in
remotes.toml beside the config file:

    [remotes.box]
    url = "http://192.168.1.20:8000/v1"
    api_key_env = "BOX_API_KEY"

A remote's models are chosen as NAME/MODEL. Its key is never stored: only the name of the
environment variable that holds it, or of a file only the user can read (`api_key_file`).
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .private import tighten, write_private

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class RemoteError(Exception):
    """A remote that cannot be added, found or read; `exit_code` 2 for what the user typed."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Remote:
    name: str
    url: str  # the API's base, ending in /v1 (where /chat/completions and /models are)
    api_key_env: str | None = None  # the environment variable holding its key
    api_key_file: str | None = None  # or the file holding it (absolute; the user's alone)

    def api_key(self) -> str | None:
        """The key from its environment variable, else its file; None when it names neither
        or the variable is unset. Raises RemoteError for a file others may read."""
        if self.api_key_env is not None:
            return os.environ.get(self.api_key_env) or None
        if self.api_key_file is None:
            return None
        return read_key_file(Path(self.api_key_file))


def read_key_file(path: Path) -> str:
    """The key in `path` (its first line), which must be a file of this user's that no one
    else can read, as ssh asks of a private key."""
    try:
        status = path.stat()
        if stat.S_IMODE(status.st_mode) & 0o077 or status.st_uid != os.geteuid():
            raise RemoteError(f"the key file {path} may be read by others: chmod 600 {path}")
        key = path.read_text(encoding="utf-8").strip().splitlines()
    except OSError as error:
        raise RemoteError(f"cannot read the key file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise RemoteError(f"the key file {path} is not text") from None
    if not key or not key[0].strip():
        raise RemoteError(f"the key file {path} is empty")
    return key[0].strip()


def checked(
    name: str, url: str, api_key_env: str | None, api_key_file: str | None = None
) -> Remote:
    """A remote from what `remote add` was given. A URL without a path gets /v1, where every
    OpenAI-compatible server has its API (llamachat, vLLM, llama.cpp, ollama)."""
    if not _NAME.fullmatch(name):
        raise RemoteError(
            f"remote name {name!r}: use letters, digits, '.', '_' or '-' (no '/'), up to 64", 2
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - read for its check: a port that is not one raises
    except ValueError:
        raise RemoteError(
            f"remote URL {url!r}: give http://HOST[:PORT][/PATH] or https://…", 2
        ) from None
    if parts.username or parts.password or parts.query or parts.fragment:
        # Not repeated back: what it carries may be a password.
        raise RemoteError(
            "the remote URL may have no user, password, query or fragment (a key goes in the"
            " variable --api-key-env names)",
            2,
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(f"remote URL {url!r}: give http://HOST[:PORT][/PATH] or https://…", 2)
    base = url.rstrip("/")
    if parts.path in ("", "/"):
        base += "/v1"
    if api_key_env is not None and not _ENV_VAR.fullmatch(api_key_env):
        raise RemoteError(f"--api-key-env {api_key_env!r} is not an environment variable name", 2)
    if api_key_env is not None and api_key_file is not None:
        raise RemoteError("give the key's --api-key-env or its --api-key-file, not both", 2)
    if api_key_file is not None:
        api_key_file = str(Path(api_key_file).expanduser().absolute())
    return Remote(name, base, api_key_env, api_key_file)


def load(path: Path) -> dict[str, Remote]:
    """The remotes in `path` by name; none when it does not exist."""
    if not path.exists():
        return {}
    tighten(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        table = data.get("remotes", {})
        remotes = {}
        for name, fields in table.items():
            remote = checked(
                name, fields["url"], fields.get("api_key_env"), fields.get("api_key_file")
            )
            remotes[remote.name] = remote
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise RemoteError(f"cannot read {path}: {error}") from None
    except (KeyError, TypeError, AttributeError, RemoteError) as error:
        raise RemoteError(f"{path} is damaged ({error}); fix it or remove it") from None
    return remotes


def save(path: Path, remotes: dict[str, Remote]) -> None:
    lines = []
    for remote in remotes.values():
        lines.append(f"[remotes.{json.dumps(remote.name)}]")
        lines.append(f"url = {json.dumps(remote.url)}")
        if remote.api_key_env is not None:
            lines.append(f"api_key_env = {json.dumps(remote.api_key_env)}")
        if remote.api_key_file is not None:
            lines.append(f"api_key_file = {json.dumps(remote.api_key_file)}")
        lines.append("")
    write_private(path, "\n".join(lines).encode("utf-8"))


def split_model(name: str, remotes: dict[str, Remote]) -> tuple[Remote, str] | None:
    """NAME/MODEL as (the remote, the model's id there) when NAME is a remote; else None (a
    local model's name)."""
    head, slash, model = name.partition("/")
    if slash and head in remotes and model:
        return remotes[head], model
    return None
