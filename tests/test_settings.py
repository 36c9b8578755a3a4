"""The config file: defaults that flags override."""

from __future__ import annotations

import pytest

from llamachat.settings import (
    QUANTIZE_CHOICES,
    Settings,
    SettingsError,
    load,
    parse_value,
    save,
)


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
        ("quantize = 'int3'\n", "quantize takes one of auto, none, int8, int4, f16"),
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
