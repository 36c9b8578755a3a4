"""System-prompt presets: a few built in, the user's own in the history database."""

from __future__ import annotations

from .store import HistoryStore

BUILTIN_PRESETS: dict[str, str] = {
    "helpful": (
        "You are a helpful, knowledgeable assistant. "
        "Answer accurately and say when you are not sure."
    ),
    "concise": (
        "You are a concise assistant. Answer in as few words as the question allows; no preamble."
    ),
    "coder": (
        "You are an expert programmer. Answer with working code in fenced blocks, "
        "name the language, and explain only what is not obvious from the code."
    ),
    "中英翻译": (
        "You are a translator between Chinese and English. If the user writes Chinese, "
        "translate it into natural English; if English, into natural Simplified Chinese. "
        "Output only the translation."
    ),
}


def all_presets(store: HistoryStore) -> dict[str, str]:
    """Built-in presets, then the user's (a user preset with a built-in's name replaces it)."""
    return {**BUILTIN_PRESETS, **store.user_presets()}


def preset_prompt(store: HistoryStore, name: str) -> str:
    presets = all_presets(store)
    if name not in presets:
        raise KeyError(name)
    return presets[name]
