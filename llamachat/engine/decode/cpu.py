"""The one-token decode step in PyTorch on the CPU, where each operation costs microseconds of
overhead however small: forward()'s arithmetic in about a third of its operations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..kv_cache import KVCache
    from ..model import Transformer


class CpuDecodeStep:
    """Attention reads exactly the positions up to this one (no mask), and queries and keys
    rotate with one matrix product by the position's rotation matrix. The model's modules are
    read at each call, so a layer replaced after loading is the one that runs."""

    def __init__(self, transformer: Transformer):
        self.transformer = transformer

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attend_len: int
    ) -> torch.Tensor:
        model, position = self.transformer, int(positions[0])
        config = model.config
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        groups, eps, width = config.n_groups, config.rms_norm_eps, config.intermediate_size
        rotation = _rotation(model.rope_cos[position], model.rope_sin[position]).to(cache.k.dtype)
        x = model.tok_embeddings(tokens).view(1, -1)  # (1, D)
        shape = x.shape[-1:]
        for layer, (keys, values) in zip(model.layers, cache.layers, strict=True):
            h = F.rms_norm(x, shape, layer.attention_norm.weight, eps)
            qkv = layer.attention.wqkv(h).view(heads + 2 * kv_heads, head_dim)
            qk = qkv[: heads + kv_heads] @ rotation  # (H + KV, hd), rotated
            keys[:, position] = qk[heads:]
            values[:, position] = qkv[heads + kv_heads :]
            q = qk[:heads].view(kv_heads, groups, head_dim)  # the query heads of each kv head
            seen_keys, seen_values = keys[:, : position + 1], values[:, : position + 1]
            scores = torch.bmm(q, seen_keys.transpose(1, 2)).mul_(head_dim**-0.5)  # (KV, G, S)
            attended = torch.bmm(torch.softmax(scores, dim=-1), seen_values)  # (KV, G, hd)
            x = x + layer.attention.wo(attended.view(1, heads * head_dim))
            h = F.rms_norm(x, shape, layer.ffn_norm.weight, eps)
            gate_up = layer.feed_forward.w13(h)
            x = x + layer.feed_forward.w2(F.silu(gate_up[:, :width]) * gate_up[:, width:])
        return model.output(model.norm(x)).float().view(1, 1, -1)


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The (hd, hd) matrix R with v @ R = v·cos + rotate_half(v)·sin for one position."""
    head_dim = cos.shape[0]
    half = head_dim // 2
    rotation = torch.diag(cos)
    columns = torch.arange(half)
    rotation[columns + half, columns] = -sin[:half]
    rotation[columns, columns + half] = sin[half:]
    return rotation
