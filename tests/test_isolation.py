"""The suite keeps to its own folders: nothing it compiles or caches lands in the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import cli_env

USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamachat"


def outside_user_cache(path: str | Path) -> bool:
    return not Path(path).resolve().is_relative_to(USER_CACHE.resolve())


def test_engine_caches_in_this_process_are_the_suites_own():
    from llamachat.engine.kernels.cpu import native

    assert outside_user_cache(native.cache_dir())
    assert outside_user_cache(os.environ["TRITON_CACHE_DIR"])


def test_engine_caches_in_a_cli_subprocess_are_the_suites_own(tmp_path):
    script = "from llamachat.engine.kernels.cpu import native; print(native.cache_dir())"
    env = cli_env(tmp_path)
    printed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert outside_user_cache(printed)
