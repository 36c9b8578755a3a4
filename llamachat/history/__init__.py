"""Conversations and system-prompt presets, kept in SQLite. Nothing here imports torch."""
