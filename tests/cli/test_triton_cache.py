"""Where compiled GPU kernels are cached when llamachat runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import cli_env

CODE = (
    "import os; from llamachat.cli.app import main; main(['list']); "
    "print(os.environ['TRITON_CACHE_DIR'])"
)


def run(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


def test_triton_kernels_are_cached_in_llamachats_cache_folder(tmp_path):
    env = cli_env(tmp_path)
    assert run(env) == str(Path(env["LLAMACHAT_CACHE_DIR"]) / "triton")


def test_a_triton_cache_the_user_chose_is_kept(tmp_path):
    env = cli_env(tmp_path) | {"TRITON_CACHE_DIR": str(tmp_path / "mine")}
    assert run(env) == str(tmp_path / "mine")
