"""Where llamachat keeps things.

Models and history live in the platformdirs user data dir, the config file in the user config
dir. LLAMACHAT_HOME replaces both with one folder (every test sets it). What lasts only while a
process runs (the records of running servers) goes to $XDG_RUNTIME_DIR/llamachat, else beside
the data, in run/. Downloads that are only
worth keeping to avoid fetching them again (pip wheels) go to the user cache dir, or
LLAMACHAT_CACHE_DIR; they are not part of a model's install. Conversations' saved KV caches
(instant resume) go to the cache dir's kv/, but with LLAMACHAT_HOME to that folder's kv/: they
are named by conversation ids of the history beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "llamachat"


@dataclass(frozen=True)
class Home:
    data: Path
    config: Path
    cache: Path
    run: Path | None = None  # None: data/run
    kv_caches: Path | None = None  # None: cache/kv

    @classmethod
    def current(cls) -> Home:
        from platformdirs import user_cache_path, user_config_path, user_data_path

        cache = os.environ.get("LLAMACHAT_CACHE_DIR")
        cache_path = Path(cache) if cache else user_cache_path(APP_NAME)
        home = os.environ.get("LLAMACHAT_HOME")
        if home:
            root = Path(home).expanduser()
            return cls(data=root, config=root, cache=cache_path, kv_caches=root / "kv")
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        run = Path(runtime) / APP_NAME if runtime else None
        return cls(user_data_path(APP_NAME), user_config_path(APP_NAME), cache_path, run)

    @property
    def models(self) -> Path:
        return self.data / "models"

    @property
    def history_db(self) -> Path:
        return self.data / "history.db"

    @property
    def themes(self) -> Path:
        """Where the user's own theme files go."""
        return self.config / "themes"

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def remotes_file(self) -> Path:
        return self.config / "remotes.toml"

    @property
    def runtime(self) -> Path:
        """Where running `llamachat serve` processes record themselves (serving.py)."""
        return self.run or self.data / "run"

    @property
    def kv(self) -> Path:
        """Where conversations' KV caches are saved when they are left (kv_files.py)."""
        return self.kv_caches or self.cache / "kv"

    @property
    def downloads(self) -> Path:
        return self.cache / "downloads"
