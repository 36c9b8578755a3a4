"""A session's KV cache on disk, so a conversation reopened later is not prefilled again: the
keys and values of the tokens it holds, with those token ids, in a safetensors file.

A file is only ever taken for what it says it is: `identity` (the caller's description of the
model, weight format and dtype, which must match exactly), the shapes of the model's cache,
and a SHA-256 over the token ids and every byte of the keys and values. Anything else (another
model, a truncated or corrupt file, one that holds more tokens than the session has room for)
raises SavedCacheError, and the caller prefills instead: never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import EngineError
from .session import ChatSession

FORMAT = "llamachat-kv-1"


class SavedCacheError(EngineError):
    """A saved cache that cannot be used; the conversation is prefilled instead."""


class SavedCacheTooLongError(SavedCacheError):
    """A sound saved cache that holds more tokens than this session's context: of use to a
    session with a larger one, so not damaged."""


def save(session: ChatSession, path: Path, identity: dict[str, str]) -> int:
    """Write the keys and values of the tokens `session` holds to `path` (atomically, 0600);
    the number of tokens written. Nothing is written for an empty session. Raises OSError when
    the file cannot be written (a full disk), leaving nothing behind."""
    count = len(session.cached_ids)
    if count == 0:
        return 0
    k = session.cache.k[:, :, :count].contiguous().cpu()
    v = session.cache.v[:, :, :count].contiguous().cpu()
    tokens = torch.tensor(session.cached_ids, dtype=torch.int64)
    metadata = {
        "format": FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "sha256": _digest(tokens, k, v),
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            save_file({"tokens": tokens, "k": k, "v": v}, str(temporary), metadata=metadata)
        except SafetensorError as error:  # the disk refused the write (full, say): an OSError
            raise OSError(f"cannot write {path.name}: {error}") from None
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count


def load(session: ChatSession, path: Path, identity: dict[str, str]) -> int:
    """Put the saved keys and values in `path` into `session`'s cache, which then holds their
    tokens; the number of tokens. Raises SavedCacheError for a file that is not what it must
    be; the session is then left empty."""
    session.reset()
    try:
        tensors, metadata = _read(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        raise SavedCacheError(f"the saved cache {path.name} cannot be read: {error}") from None
    if metadata.get("format") != FORMAT:
        raise SavedCacheError(f"the saved cache {path.name} is not one llamachat wrote")
    if metadata.get("identity") != json.dumps(identity, sort_keys=True):
        raise SavedCacheError(f"the saved cache {path.name} is of another model or format")
    tokens, k, v = (tensors.get(name) for name in ("tokens", "k", "v"))
    cache = session.cache
    if tokens is None or k is None or v is None or tokens.ndim != 1 or k.shape != v.shape:
        raise SavedCacheError(f"the saved cache {path.name} lacks its tensors")
    count = tokens.shape[0]
    layers, kv_heads, _, head_dim = cache.k.shape
    if tuple(k.shape) != (layers, kv_heads, count, head_dim) or k.dtype != cache.k.dtype:
        raise SavedCacheError(f"the saved cache {path.name} does not fit this model's cache")
    if not 0 < count <= min(cache.max_len, session.ctx):
        raise SavedCacheTooLongError(f"the saved cache {path.name} holds more than the context")
    if metadata.get("sha256") != _digest(tokens, k, v):
        raise SavedCacheError(f"the saved cache {path.name} is damaged (its checksum differs)")
    cache.k[:, :, :count].copy_(k)
    cache.v[:, :, :count].copy_(v)
    session.cached_ids = tokens.tolist()
    return count


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = dict(file.metadata() or {})
    return load_file(str(path)), metadata


def _digest(tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (tokens, k, v):
        digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
