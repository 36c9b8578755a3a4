"""The per-session key/value cache."""

from __future__ import annotations

import math
import mmap

import torch

from .config import ModelConfig


def _zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor; on a CPU in anonymous mapped memory, which the OS hands out zeroed and
    only as it is written, so a cache's unused positions (most of an 8k window in a one-shot
    answer) cost neither memory nor the time to zero them."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    `k` and `v` are each (layers, n_kv_heads, max_len, head_dim): only the kv heads are stored,
    so a GQA model (Llama-2-70B: 64 query heads over 8 kv heads) keeps an eighth of what MHA
    would, and MQA a single head. One token costs 2 × layers × kv_heads × head_dim × dtype bytes.
    Positions are written by index; what lies past the valid length is never read unmasked.
    """

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = _zeros(shape, device, dtype)
        self.v = _zeros(shape, device, dtype)
        self.max_len = max_len
        # Each layer's (n_kv, max_len, hd) keys and values, as views made once.
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache whose keys and values are the given (layers, n_kv, max_len, hd) tensors, such
        as one slot's share of a batch's pool."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len = k, v, k.shape[2]
        cache.layers = list(zip(k.unbind(0), v.unbind(0), strict=True))
        return cache

    @property
    def bytes_per_token(self) -> int:
        layers, kv_heads, _, head_dim = self.k.shape
        return 2 * layers * kv_heads * head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attend_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, n_kv, T, hd) at `positions` (T,) and return this layer's keys and values
        for positions [0, attend_len), each (1, n_kv, attend_len, hd)."""
        layer_k, layer_v = self.k[layer], self.v[layer]  # (n_kv, max_len, hd)
        layer_k.index_copy_(1, positions, k[0])
        layer_v.index_copy_(1, positions, v[0])
        return layer_k[None, :, :attend_len], layer_v[None, :, :attend_len]
