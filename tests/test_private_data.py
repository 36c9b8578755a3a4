"""User data is private, as ssh and gpg keep theirs: the data and config folders and the models
folder 0700, the history database (with its -wal and -shm files) and the config file 0600,
whatever the umask; an existing install that others could read is tightened when it is opened.

Every check runs the real command in a subprocess started with the permissive umask 0o022, the
usual default, under which files would be created 0644 in 0755 folders.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli_env

PERMISSIVE_UMASK = 0o022

# Opens the history as the commands do and, while it is open (so that SQLite's -wal and -shm
# files exist), prints the mode of the database and of both.
OPEN_HISTORY = textwrap.dedent(
    """
    import os
    from llamachat.history.store import HistoryStore
    from llamachat.home import Home
    path = Home.current().history_db
    store = HistoryStore(path)
    store.add_message(store.create(), "user", "a private question")
    for suffix in ("", "-wal", "-shm"):
        print(oct(os.stat(f"{path}{suffix}").st_mode & 0o777))
    """
)


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, env=env, capture_output=True, text=True, umask=PERMISSIVE_UMASK, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result


def llamachat(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "llamachat", *args], env)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def history_modes(env: dict[str, str]) -> list[int]:
    return [int(line, 8) for line in run([sys.executable, "-c", OPEN_HISTORY], env).stdout.split()]


@pytest.fixture(scope="module")
def folder(tiny_model_factory) -> Path:
    """A tiny model's folder, to pull."""
    return tiny_model_factory()[0]


def test_a_new_llamachat_home_is_private(tmp_path, folder):
    home = tmp_path / "not-yet" / "home"  # its parent is missing too
    env = cli_env(tmp_path, LLAMACHAT_HOME=str(home))
    llamachat("config", "set", "system", "You know my secrets.", env=env)
    assert mode(home) == 0o700 and mode(home / "config.toml") == 0o600
    assert mode(tmp_path / "not-yet") == 0o700
    assert history_modes(env) == [0o600, 0o600, 0o600]
    assert mode(home / "history.db") == 0o600
    llamachat("pull", str(folder), "--as", "tiny", env=env)
    assert mode(home / "models") == 0o700


def test_the_platform_folders_are_private(tmp_path, folder):
    user = tmp_path / "user"
    user.mkdir()
    env = cli_env(tmp_path, HOME=str(user))
    for key in ("LLAMACHAT_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        env.pop(key, None)
    llamachat("config", "set", "temperature", "0.5", env=env)
    llamachat("pull", str(folder), "--as", "tiny", env=env)
    assert history_modes(env) == [0o600, 0o600, 0o600]
    data, config = user / ".local" / "share" / "llamachat", user / ".config" / "llamachat"
    assert mode(config) == 0o700 and mode(config / "config.toml") == 0o600
    assert mode(data) == 0o700 and mode(data / "models") == 0o700
    assert mode(data / "history.db") == 0o600


def test_an_existing_install_that_others_can_read_is_tightened(tmp_path, folder):
    home = tmp_path / "home"
    env = cli_env(tmp_path)
    llamachat("pull", str(folder), "--as", "tiny", env=env)
    llamachat("config", "set", "temperature", "0.5", env=env)
    # As an older llamachat left them: a 0644 database and config in 0755 folders, and an older
    # llamachat still running, so that the database's -wal and -shm files exist (0644 too).
    for path in (home, home / "models"):
        path.chmod(0o755)
    (home / "config.toml").chmod(0o644)
    old = sqlite3.connect(home / "history.db", isolation_level=None)
    (home / "history.db").chmod(0o644)
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("CREATE TABLE IF NOT EXISTS kept (x)")
    assert mode(Path(f"{home / 'history.db'}-wal")) == 0o644
    try:
        llamachat("config", env=env)
        assert mode(home / "config.toml") == 0o600
        assert history_modes(env) == [0o600, 0o600, 0o600]
        assert mode(home) == 0o700
        llamachat("pull", str(folder), "--as", "tiny2", env=env)
        assert mode(home / "models") == 0o700
    finally:
        old.close()
