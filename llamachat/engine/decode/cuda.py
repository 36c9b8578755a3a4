"""The one-token decode step through fused Triton kernels on a GPU (kernels/cuda/): per block two
norms (each fused with the residual add before it), rotary + cache write, two attention kernels,
SwiGLU's gate and the four matrix products. Imports Triton: imported only where it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cuda.fused import add_rms_norm, decode_attention, rope_and_cache, silu_mul
from ..kernels.cuda.gemv import gemv
from ..quantize import Int4Linear

if TYPE_CHECKING:
    from ..kernels.cuda.activations import Int8Activations
    from ..kv_cache import KVCache
    from ..model import Transformer


class FusedDecodeStep:
    """forward() for one token with the fused kernels, for a model in half precision whose
    head_dim and query groups they take (decode.fused_kernels_fit says which)."""

    def __init__(self, transformer: Transformer):
        self.transformer = transformer

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attend_len: int
    ) -> torch.Tensor:
        model = self.transformer
        project = _one_row_product
        eps = model.config.rms_norm_eps
        heads = model.config.n_heads
        x = model.tok_embeddings(tokens).view(1, -1)  # (1, D): the residual stream
        h = F.rms_norm(x, x.shape[-1:], model.layers[0].attention_norm.weight, eps)
        rounded = None  # h rounded to int8 by the kernel that made it, for an int4 layer
        layers = list(zip(model.layers, cache.layers, strict=True))
        for index, (layer, (k_cache, v_cache)) in enumerate(layers):
            qkv = project(layer.attention.wqkv, h, rounded)  # (1, (H + 2·KV)·hd)
            q = rope_and_cache(
                qkv, model.rope_cos, model.rope_sin, positions, k_cache, v_cache, heads
            )
            attended, attended_rounded = decode_attention(
                q, k_cache, v_cache, positions, attend_len, _takes_int8(layer.attention.wo)
            )  # (1, H·hd)
            ffn = layer.feed_forward
            out = project(layer.attention.wo, attended, attended_rounded)
            h, rounded = add_rms_norm(x, out, layer.ffn_norm.weight, eps, _takes_int8(ffn.w13))
            gated, gated_rounded = silu_mul(project(ffn.w13, h, rounded), _takes_int8(ffn.w2))
            last = index + 1 == len(model.layers)
            following = model.norm if last else model.layers[index + 1].attention_norm
            consumer = model.output if last else model.layers[index + 1].attention.wqkv
            out = project(ffn.w2, gated, gated_rounded)
            h, rounded = add_rms_norm(x, out, following.weight, eps, _takes_int8(consumer))
        return project(model.output, h, rounded).float().view(1, 1, -1)


def _takes_int8(linear: nn.Module) -> bool:
    """Whether the kernel making this layer's input should also round it to int8 (gemv.py)."""
    return isinstance(linear, Int4Linear)


def _one_row_product(
    linear: nn.Module, x: torch.Tensor, rounded: Int8Activations | None = None
) -> torch.Tensor:
    """linear(x) for one row x (1, K): plain weights through the Triton GEMV (faster than
    cuBLAS at one row), quantised layers through their own one-row kernels (an int4 layer takes
    x already rounded to int8 when the kernel that made x did that too)."""
    if isinstance(linear, Int4Linear):
        return linear(x, rounded)
    if not isinstance(linear, nn.Linear):
        return linear(x)
    out = gemv(x, linear.weight)
    return out if linear.bias is None else out + linear.bias
