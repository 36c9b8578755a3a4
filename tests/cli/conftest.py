"""Fixtures the command-line tests share."""

from __future__ import annotations

import pytest

from tests.conftest import cli_env


@pytest.fixture
def env(tmp_path):
    """A fresh llamachat home for one test."""
    return cli_env(tmp_path)


@pytest.fixture
def folder(tiny_model_factory):
    """The default tiny model's folder, to pull from."""
    return tiny_model_factory()[0]
