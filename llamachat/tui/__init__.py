"""The Textual chat app. `run` is its one entry point; nothing here imports the CLI."""

from __future__ import annotations

from ..home import Home
from .app import ChatAppOptions, LlamaChatApp, make_app

__all__ = ["ChatAppOptions", "LlamaChatApp", "make_app", "run"]


def run(options: ChatAppOptions) -> None:
    make_app(Home.current(), options).run()
