"""The config file: defaults that flags override."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamachat.settings import (
    QUANTIZE_CHOICES,
    Settings,
    SettingsError,
    load,
    parse_value,
    save,
)
from tests.conftest import cli_env, run_cli


def test_round_trip_keeps_every_value(tmp_path):
    path = tmp_path / "config.toml"
    settings = Settings(
        default_model="smollm2", system='Say "hi" — 你好\nthen stop', temperature=0.5, ctx=4096
    )
    save(path, settings)
    assert load(path) == settings


def test_missing_file_means_nothing_is_set(tmp_path):
    assert load(tmp_path / "absent.toml").items() == []


def test_integers_are_accepted_where_numbers_are_expected(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("temperature = 1\n")
    assert load(path).temperature == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("temperature = [", "not valid TOML"),
        ("colour = 'red'\n", "unknown setting 'colour'"),
        ("ctx = 'big'\n", "ctx takes a whole number"),
        ("ctx = true\n", "ctx takes a whole number"),
        ("quantize = 'int3'\n", "quantize takes one of auto, none, int8, int4, fp8, f16"),
    ],
)
def test_bad_files_are_named_with_the_problem(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message):
        load(path)


def test_values_typed_on_the_command_line_are_checked():
    assert parse_value("top_k", "40") == 40
    assert parse_value("system", "be brief") == "be brief"
    with pytest.raises(SettingsError, match="a number"):
        parse_value("temperature", "warm")


def test_quantize_takes_the_engines_formats_and_nothing_else():
    from llamachat.engine.quantize import CHOICES

    assert QUANTIZE_CHOICES == CHOICES
    assert [parse_value("quantize", choice) for choice in CHOICES] == list(CHOICES)
    with pytest.raises(SettingsError, match="not 'int3'"):
        parse_value("quantize", "int3")


def test_a_value_that_is_not_utf8_is_refused_in_one_line_and_leaves_no_file(tmp_path):
    env = cli_env(tmp_path)
    home = Path(env["LLAMACHAT_HOME"])
    assert run_cli("config", "set", "system", "Be brief.", env=env).returncode == 0
    # The shell's $'\xff': Python gives the argument as a str holding a lone surrogate.
    result = subprocess.run(
        [sys.executable, "-m", "llamachat", "config", "set", "system", b"\xff"],
        env=env,
        capture_output=True,
    )
    assert result.returncode == 2
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("llamachat: error: ") and "UTF-8" in line
    assert sorted(p.name for p in home.iterdir()) == ["config.toml"]
    assert load(home / "config.toml").system == "Be brief."


def test_a_bad_value_on_the_command_line_is_a_usage_error(tmp_path):
    env = cli_env(tmp_path)
    result = run_cli("config", "set", "top_k", "many", env=env)
    assert result.returncode == 2 and b"top_k takes a whole number" in result.stderr
    assert run_cli("config", "unset", "colour", env=env).returncode == 2


def test_save_never_leaves_its_temporary_file(tmp_path):
    path = tmp_path / "config.toml"
    save(path, Settings(system="kept"))
    with pytest.raises(SettingsError, match="UTF-8"):
        save(path, Settings(system="\udcff"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    assert load(path).system == "kept"
    # The last step fails: the file cannot replace a folder of the same name.
    folder = tmp_path / "taken"
    (folder / "config.toml").mkdir(parents=True)
    with pytest.raises(OSError):
        save(folder / "config.toml", Settings(system="lost"))
    assert [p.name for p in folder.iterdir()] == ["config.toml"]
