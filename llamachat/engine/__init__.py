"""llamachat's own LLaMA implementation in PyTorch, and the API the front ends drive.

    model = ChatModel.load("path/to/model")          # device="auto", dtype=None (bf16 / fp32)
    session = model.session(ctx=4096)                 # one KV cache, reused across turns
    reply = session.reply(messages, SamplingParams(temperature=0.7, seed=1), max_new_tokens=256)
    for piece in reply:                               # text, never half a character
        print(piece, end="", flush=True)
    reply.stats                                       # prompt/reused/prefilled tokens, TTFT, tok/s

The package is laid out by what runs where: the architecture in model.py (PyTorch, any device),
the kernels by device in kernels/cuda/ (Triton; imported only on a GPU) and kernels/cpu/ (C
through ctypes), the quantised layers that call them in quantize.py, and in decode/ the
one-token routes (fused CUDA kernels, the C step, PyTorch on the CPU), one chosen per model when
it loads. Around them: config, loading, tokenizer and chat format, the KV cache, sampling, and
the session that ties them into a chat (cuda_graphs.py replays its decode step on a GPU).

This package imports torch and transformers (for tokenizers), never a UI library. The names
below load on first use, so `llamachat.engine.config` and `.errors` (which the model store reads
without torch) stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every public name → the module that defines it, loaded on first use (the TYPE_CHECKING imports
# below name the same for type checkers).
_EXPORTS = {
    "BUILTIN_FORMATS": "chat_format",
    "ChatFormat": "chat_format",
    "ChatMessage": "chat_format",
    "DEFAULT_CONTEXT": "chat_model",
    "ChatModel": "chat_model",
    "ModelConfig": "config",
    "RopeScaling": "config",
    "ContextOverflowError": "errors",
    "DeviceError": "errors",
    "EngineError": "errors",
    "ModelLoadError": "errors",
    "UnsupportedModelError": "errors",
    "KVCache": "kv_cache",
    "GREEDY": "sampling",
    "SamplingParams": "sampling",
    "ChatSession": "session",
    "Prompt": "prompts",
    "Reply": "session",
    "GenerationStats": "session",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names for type checkers; F401: ruff cannot read a built __all__
    from .chat_format import BUILTIN_FORMATS, ChatFormat, ChatMessage  # noqa: F401
    from .chat_model import DEFAULT_CONTEXT, ChatModel  # noqa: F401
    from .config import ModelConfig, RopeScaling  # noqa: F401
    from .errors import (  # noqa: F401
        ContextOverflowError,
        DeviceError,
        EngineError,
        ModelLoadError,
        UnsupportedModelError,
    )
    from .kv_cache import KVCache  # noqa: F401
    from .prompts import Prompt  # noqa: F401
    from .sampling import GREEDY, SamplingParams  # noqa: F401
    from .session import ChatSession, GenerationStats, Reply  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamachat.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
