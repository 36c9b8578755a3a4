"""The LLaMA decoder: embedding, N pre-norm blocks of attention and SwiGLU MLP, final norm, LM head.

Query/key/value and gate/up projections are fused into one matrix each (one read of the input,
one kernel launch); the loader concatenates the checkpoint's separate matrices into them.

A one-token (decode) step has two faster routes with the same arithmetic: fused Triton kernels on
a GPU in half precision (kernels/cuda/), and a step with few operations on the CPU
(for int4 on an x86 CPU, one call into C: native_step.py).
Prompts (prefill) take the general forward().
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .quantize import Int4Linear
from .rope import apply_rope, rope_tables

if TYPE_CHECKING:
    from .kernels.cuda.activations import Int8Activations


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel, accumulating in float32 whatever the activation dtype.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.split = (config.q_size, config.kv_size, config.kv_size)
        self.wqkv = nn.Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.wo = nn.Linear(config.q_size, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        layer: int,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(batch, length, heads + 2 * kv_heads, head_dim)
        # Queries and keys rotate together: one pass over both instead of two.
        qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)  # (B, T, H + KV, hd)
        q = qk[:, :, :heads].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, heads:].transpose(1, 2)  # (B, KV, T, hd)
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)  # (B, KV, T, hd)
        keys, values = cache.update(layer, positions, k, v, mask.shape[-1])  # (B, KV, S, hd)
        # GQA without repeating kv heads: the query heads that share a kv head are stacked along
        # the sequence axis, so each kv head is read once for all of its group.
        groups = heads // kv_heads
        q = q.reshape(batch, kv_heads, groups * length, head_dim)  # (B, KV, G·T, hd)
        if length == 1:
            out = _decode_attention(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.reshape(batch, heads, length, head_dim)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


SPLIT = 256  # keys per slice of the attention sum (attention lengths are multiples of it)


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Attention for one new token as batched matrix products, `bias` being 0 where a key is
    visible and -inf elsewhere, (G, S).

    With only G query rows per kv head, fused attention kernels leave most of the GPU idle on a
    long cache. Scores are a wide product (each key read once, spread over the chip); the sum
    over values is split into slices of SPLIT keys, multiplied in parallel and added up, so it
    does not run as a handful of long serial reductions."""
    batch, kv_heads, groups, head_dim = q.shape
    span = keys.shape[-2]
    scores = torch.matmul(q * head_dim**-0.5, keys.transpose(-1, -2))  # (B, KV, G, S)
    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(values.dtype)
    if span % SPLIT:
        return torch.matmul(probs, values)  # (B, KV, G, hd)
    slices = span // SPLIT
    probs = probs.view(batch, kv_heads, groups, slices, SPLIT).transpose(2, 3)  # (B, KV, C, G, s)
    values = values.reshape(batch, kv_heads, slices, SPLIT, head_dim)  # (B, KV, C, s, hd)
    return torch.matmul(probs, values).sum(dim=2)  # (B, KV, G, hd)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache, layer, positions) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, positions)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        # One-token steps through the fused Triton kernels (kernels/cuda/fused.py); set by
        # enable_fused_decode where they run.
        self.fused_decode = False
        # One-token steps of an int4 model on the CPU as one C call (native_step.py); set by
        # enable_native_decode where it runs.
        self.native_decode: Callable[[torch.Tensor, int, KVCache], torch.Tensor] | None = None

    def enable_fused_decode(self) -> bool:
        """Use the fused decode kernels if this model can: CUDA, half precision, head_dim a
        power of two, at most 16 query heads per kv head, and Triton importable."""
        weight = self.tok_embeddings.weight
        head_dim, groups = self.config.head_dim, self.config.n_groups
        self.fused_decode = (
            weight.device.type == "cuda"
            and weight.dtype in (torch.bfloat16, torch.float16)
            and head_dim >= 16
            and head_dim & (head_dim - 1) == 0
            and groups <= 16
            and importlib.util.find_spec("triton") is not None
        )
        return self.fused_decode

    def enable_native_decode(self) -> bool:
        """Use the C decode step if this model can: int4 on an x86 CPU with AVX2, float32."""
        from .native_step import NativeDecodeStep

        self.native_decode = NativeDecodeStep.for_model(self)
        return self.native_decode is not None

    def setup_rope(self, max_len: int) -> None:
        """Build the rotary tables for positions [0, max_len) on the weights' device."""
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = rope_tables(self.config, max_len, device)

    @property
    def rope_len(self) -> int:
        return 0 if self.rope_cos is None else self.rope_cos.shape[0]

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        attend_len: int,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Run tokens (1, T) at `positions` (T,), reading the cache up to `attend_len`.

        Shapes depend only on T and attend_len, never on the positions' values, so a decode step
        (T = 1) at any position within one attend_len is the same computation graph.
        Returns float32 logits (1, 1, V) for the last token, or (1, T, V) with last_only=False.
        """
        assert self.rope_cos is not None and self.rope_sin is not None, "call setup_rope first"
        if tokens.shape[1] == 1:
            if self.fused_decode:
                return self._fused_decode_step(tokens, positions, cache, attend_len)
            if self.native_decode is not None:
                return self.native_decode(tokens, int(positions[0]), cache)
            if tokens.device.type == "cpu":
                return self._cpu_decode_step(tokens, int(positions[0]), cache)
        x = self.tok_embeddings(tokens)  # (1, T, D)
        cos = self.rope_cos[positions].to(x.dtype)[:, None]  # (T, 1, hd): every head alike
        sin = self.rope_sin[positions].to(x.dtype)[:, None]
        # Key s is visible to the query at position p when s ≤ p; rows repeat per query group.
        key_positions = torch.arange(attend_len, device=tokens.device)
        mask = key_positions[None, :] <= positions[:, None]  # (T, S)
        if tokens.shape[1] == 1:  # decode: an additive bias, 0 or -inf, (1, S)
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        else:
            mask = mask.repeat(self.config.n_groups, 1)  # (G·T, S)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, index, positions)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def _cpu_decode_step(self, tokens: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """forward() for one token on the CPU, where each PyTorch operation costs microseconds
        of overhead however small: the same arithmetic in about a third of the operations.
        Attention reads exactly the positions up to this one (no mask), and queries and keys
        rotate with one matrix product by the position's rotation matrix."""
        config = self.config
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        groups, eps, width = config.n_groups, config.rms_norm_eps, config.intermediate_size
        rotation = _rotation(self.rope_cos[position], self.rope_sin[position]).to(cache.k.dtype)
        x = self.tok_embeddings(tokens).view(1, -1)  # (1, D)
        shape = x.shape[-1:]
        for layer, (keys, values) in zip(self.layers, cache.layers, strict=True):
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
        return self.output(self.norm(x)).float().view(1, 1, -1)

    def _fused_decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attend_len: int
    ) -> torch.Tensor:
        """forward() for one token with the fused kernels: per block two norms (each fused with
        the residual add before it), rotary + cache write, two attention kernels, SwiGLU's gate
        and the four matrix products."""
        from .kernels.cuda.fused import add_rms_norm, decode_attention, rope_and_cache, silu_mul

        project = _one_row_product
        eps = self.config.rms_norm_eps
        heads = self.config.n_heads
        x = self.tok_embeddings(tokens).view(1, -1)  # (1, D): the residual stream
        h = F.rms_norm(x, x.shape[-1:], self.layers[0].attention_norm.weight, eps)
        rounded = None  # h rounded to int8 by the kernel that made it, for an int4 layer
        layers = list(zip(self.layers, cache.layers, strict=True))
        for index, (layer, (k_cache, v_cache)) in enumerate(layers):
            qkv = project(layer.attention.wqkv, h, rounded)  # (1, (H + 2·KV)·hd)
            q = rope_and_cache(
                qkv, self.rope_cos, self.rope_sin, positions, k_cache, v_cache, heads
            )
            attended, attended_rounded = decode_attention(
                q, k_cache, v_cache, positions, attend_len, _takes_int8(layer.attention.wo)
            )  # (1, H·hd)
            ffn = layer.feed_forward
            out = project(layer.attention.wo, attended, attended_rounded)
            h, rounded = add_rms_norm(x, out, layer.ffn_norm.weight, eps, _takes_int8(ffn.w13))
            gated, gated_rounded = silu_mul(project(ffn.w13, h, rounded), _takes_int8(ffn.w2))
            last = index + 1 == len(self.layers)
            following = self.norm if last else self.layers[index + 1].attention_norm
            consumer = self.output if last else self.layers[index + 1].attention.wqkv
            out = project(ffn.w2, gated, gated_rounded)
            h, rounded = add_rms_norm(x, out, following.weight, eps, _takes_int8(consumer))
        return project(self.output, h, rounded).float().view(1, 1, -1)


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The (hd, hd) matrix R with v @ R = v·cos + rotate_half(v)·sin for one position."""
    head_dim = cos.shape[0]
    half = head_dim // 2
    rotation = torch.diag(cos)
    columns = torch.arange(half)
    rotation[columns + half, columns] = -sin[:half]
    rotation[columns, columns + half] = sin[half:]
    return rotation


def _takes_int8(linear: nn.Module) -> bool:
    """Whether the kernel making this layer's input should also round it to int8 (gemv)."""
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
    from .kernels.cuda.gemv import gemv

    out = gemv(x, linear.weight)
    return out if linear.bias is None else out + linear.bias
