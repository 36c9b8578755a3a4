"""`llamachat serve`'s HTTP layer: OpenAI's API over opened backend chats.

It only translates requests into `Chat.reply`/`Chat.complete` calls and replies back into
OpenAI's JSON and SSE; it never imports the engine, the CLI or the app.
"""

from .app import create_app

__all__ = ["create_app"]
