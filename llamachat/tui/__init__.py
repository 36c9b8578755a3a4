"""The Textual chat app. `run` is its one entry point; nothing here imports the CLI."""

from __future__ import annotations

from ..chat_options import ChatOptions
from ..home import Home
from .app import LlamaChatApp, make_app

__all__ = ["LlamaChatApp", "make_app", "run"]


def run(options: ChatOptions) -> None:
    make_app(Home.current(), options).run()
