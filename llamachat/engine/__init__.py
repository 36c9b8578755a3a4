"""llamachat's own LLaMA implementation in PyTorch, and the API the front ends drive.

    model = ChatModel.load("path/to/model")          # device="auto", dtype=None (bf16 / fp32)
    session = model.session(ctx=4096)                 # one KV cache, reused across turns
    reply = session.reply(messages, SamplingParams(temperature=0.7, seed=1), max_new_tokens=256)
    for piece in reply:                               # text, never half a character
        print(piece, end="", flush=True)
    reply.stats                                       # prompt/reused/prefilled tokens, TTFT, tok/s

This package imports torch and transformers (for tokenizers), never a UI library.
"""

from .chat_format import BUILTIN_FORMATS, ChatFormat, Message
from .chat_model import DEFAULT_CONTEXT, ChatModel
from .config import ModelConfig, RopeScaling
from .errors import (
    ContextOverflowError,
    DeviceError,
    EngineError,
    ModelLoadError,
    UnsupportedModelError,
)
from .kv_cache import KVCache
from .sampling import GREEDY, SamplingParams
from .session import ChatSession, Prompt, Reply, ReplyStats

__all__ = [
    "BUILTIN_FORMATS",
    "DEFAULT_CONTEXT",
    "GREEDY",
    "ChatFormat",
    "ChatModel",
    "ChatSession",
    "ContextOverflowError",
    "DeviceError",
    "EngineError",
    "KVCache",
    "Message",
    "ModelConfig",
    "ModelLoadError",
    "Prompt",
    "Reply",
    "ReplyStats",
    "RopeScaling",
    "SamplingParams",
    "UnsupportedModelError",
]
