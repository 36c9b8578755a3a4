"""The one-token decode step through fused Triton kernels on a GPU (kernels/cuda/): per block two
norms (each fused with the residual add before it), rotary + cache write, two attention kernels,
SwiGLU's gate and the four matrix products; for a session's token, and (fused_forward) for one
token of each sequence in a batch (decode/batch.py). Imports Triton: imported only where it
runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cuda.fused import (
    add_rms_norm,
    attention_chunks,
    decode_attention,
    rope_and_cache,
    silu_mul,
)
from ..kernels.cuda.gemv import gemv
from ..quantize import Int4Linear, Int8Linear
from ..shard_layers import RowParallel
from .logits import float32_logits

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
        chunks = attention_chunks(attend_len)

        def attend(index: int, q: torch.Tensor, quantize: bool):
            k_cache, v_cache = cache.layers[index]
            return decode_attention(q, k_cache, v_cache, positions, chunks, quantize)

        logits = fused_forward(self.transformer, tokens.view(1), positions, cache.layers, attend)
        return logits.view(1, 1, -1)


Attend = Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, "Int8Activations | None"]]


def fused_forward(
    model: Transformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    attend: Attend,
    slots: torch.Tensor | None = None,
    logit_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits (R, V) for tokens (R,) at `positions` (R,) through the fused kernels: one
    token of a session (R = 1), or of each sequence in a batch. `caches` are each layer's keys
    and values, (kv, max_len, hd), or with `slots` (R,) pools (slots, kv, max_len, hd) that row
    r writes at slot slots[r]; every row's key and value are written before `attend(layer,
    queries (R, H, hd), quantize)` reads them. One row multiplies through the Triton GEMV and
    the int4 path's int8 activations; several through the matrix products. With `logit_rows`,
    only those rows reach the LM head."""
    eps = model.config.rms_norm_eps
    heads = model.config.n_heads
    x = model.tok_embeddings(tokens)  # (R, D): the residual stream
    h = F.rms_norm(x, x.shape[-1:], model.layers[0].attention_norm.weight, eps)
    one_row = tokens.shape[0] == 1
    project = _one_row_product if one_row else _rows_product
    rounded = None  # h rounded to int8 by the kernel that made it, for an int4 layer
    for index, (layer, (k_cache, v_cache)) in enumerate(zip(model.layers, caches, strict=True)):
        qkv = project(layer.attention.wqkv, h, rounded)  # (R, (H + 2·KV)·hd)
        q = rope_and_cache(
            qkv, model.rope_cos, model.rope_sin, positions, k_cache, v_cache, heads, slots
        )
        attended, attended_rounded = attend(index, q, one_row and _takes_int8(layer.attention.wo))
        ffn = layer.feed_forward
        out = project(layer.attention.wo, attended, attended_rounded)
        quantize = one_row and _takes_int8(ffn.w13)
        h, rounded = add_rms_norm(x, out, layer.ffn_norm.weight, eps, quantize)
        gated, gated_rounded = silu_mul(
            project(ffn.w13, h, rounded), one_row and _takes_int8(ffn.w2)
        )
        out = project(ffn.w2, gated, gated_rounded)
        if index + 1 < len(model.layers):
            following = model.layers[index + 1].attention_norm
            quantize = one_row and _takes_int8(model.layers[index + 1].attention.wqkv)
            h, rounded = add_rms_norm(x, out, following.weight, eps, quantize)
    if logit_rows is not None:
        x, out = x[logit_rows], out[logit_rows]
    h, rounded = add_rms_norm(x, out, model.norm.weight, eps, one_row and _takes_int8(model.output))
    return float32_logits(model.output, h, rounded)


def _takes_int8(linear: nn.Module) -> bool:
    """Whether the kernel making this layer's input should also round it to int8 (gemv.py)."""
    layer = linear.local if isinstance(linear, RowParallel) else linear
    return isinstance(layer, Int4Linear) or (isinstance(layer, Int8Linear) and layer.rounds_one_row)


def _one_row_product(
    linear: nn.Module, x: torch.Tensor, rounded: Int8Activations | None = None
) -> torch.Tensor:
    """linear(x) for one row x (1, K): plain weights through the Triton GEMV (faster than
    cuBLAS at one row), quantised layers through their own one-row kernels (an int4 layer takes
    x already rounded to int8 when the kernel that made x did that too)."""
    if isinstance(linear, RowParallel):  # a rank's part of o or down: its sum, then the others'
        return linear.reduce(_one_row_product(linear.local, x, rounded))
    if isinstance(linear, Int4Linear):
        return linear(x, rounded)
    if isinstance(linear, Int8Linear):
        return linear(x, activations=rounded)
    if not isinstance(linear, nn.Linear):
        return linear(x)
    out = gemv(x, linear.weight)
    return out if linear.bias is None else out + linear.bias


def _rows_product(
    linear: nn.Module, x: torch.Tensor, rounded: Int8Activations | None = None
) -> torch.Tensor:
    """linear(x) for several rows x (R, K): a matrix product."""
    return linear(x)
