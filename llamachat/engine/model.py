"""The LLaMA decoder: embedding, N pre-norm blocks of attention and SwiGLU MLP, final norm, LM head.

Query/key/value and gate/up projections are fused into one matrix each (one read of the input,
one kernel launch); the loader concatenates the checkpoint's separate matrices into them.

This is the architecture, in PyTorch for every device. A one-token (decode) step can take a
faster route with the same arithmetic, chosen once when the model loads (decode/); prompts
(prefill) always take forward().
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rope, rope_tables

if TYPE_CHECKING:
    from .decode import DecodeStep, Logits
    from .parallel.group import Leader

Device = torch.device | str | None


class Linear(nn.Linear):
    """nn.Linear without its random initialisation, which the checkpoint's tensors replace:
    on the meta device that initialisation runs PyTorch's Python reference kernels, and their
    first call imports torch._dynamo (a second or more of every start)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without its random initialisation, as Linear."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: Device = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel, accumulating in float32 whatever the activation dtype.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, device: Device = None):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.split = (config.q_size, config.kv_size, config.kv_size)
        bias = config.attention_bias
        self.wqkv = Linear(config.hidden_size, sum(self.split), bias=bias, device=device)
        self.wo = Linear(config.q_size, config.hidden_size, bias=bias, device=device)

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
            out = masked_attention(q, keys, values, mask)
        out = out.reshape(batch, heads, length, head_dim)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


# cuDNN's attention builds a plan for each new shape, on the CPU: 40 ms to over a second on an
# H200, and nearly every prompt (or prompt chunk) is a new shape. The others are fixed kernels.
_FIXED_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention of `q` over `keys`/`values` where `mask` allows, on any
    backend but cuDNN's."""
    with sdpa_kernel(_FIXED_KERNELS):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


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

    def __init__(self, config: ModelConfig, device: Device = None):
        super().__init__()
        dim, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.w13 = Linear(dim, 2 * hidden, bias=bias, device=device)
        self.w2 = Linear(hidden, dim, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, device: Device = None):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.attention = Attention(config, device)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.feed_forward = FeedForward(config, device)

    def forward(self, x, cos, sin, mask, cache, layer, positions) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, positions)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Its tensors are left uninitialised, for a checkpoint's to be assigned in; on
    `device="meta"` they take no memory (loading.py)."""

    def __init__(self, config: ModelConfig, device: Device = None):
        super().__init__()
        self.config = config
        dim, vocab = config.hidden_size, config.vocab_size
        self.tok_embeddings = Embedding(vocab, dim, device=device)
        self.layers = nn.ModuleList(Block(config, device) for _ in range(config.n_layers))
        self.norm = RMSNorm(dim, config.rms_norm_eps, device)
        self.output = Linear(dim, vocab, bias=False, device=device)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        # The route a one-token step takes where it has a faster one than forward(): set once
        # the weights are in place (decode.choose_decode_step).
        self.decode_step: DecodeStep | None = None
        # How the head's output becomes float32 logits where the device has a better way than
        # a cast (decode.choose_logits): set with the decode step.
        self.logits: Logits | None = None
        # Rank 0 of a tensor-parallel model: tells the other ranks to run each call it runs
        # (parallel/group.py). None for a model on one device.
        self.leader: Leader | None = None

    def setup_rope(self, max_len: int) -> None:
        """Build the rotary tables for positions [0, max_len) on the weights' device."""
        if self.leader is not None:
            self.leader.setup_rope(max_len)
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
        if self.leader is not None:
            with self.leader.forward(tokens, positions, cache, attend_len, last_only):
                return self._run(tokens, positions, cache, attend_len, last_only)
        return self._run(tokens, positions, cache, attend_len, last_only)

    def _run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        attend_len: int,
        last_only: bool,
    ) -> torch.Tensor:
        assert self.rope_cos is not None and self.rope_sin is not None, "call setup_rope first"
        if tokens.shape[1] == 1 and self.decode_step is not None:
            return self.decode_step(tokens, positions, cache, attend_len)
        # A step that reads prompts too (the C step) reads them with its own arithmetic, so that
        # a prompt's keys and values are those its tokens would get decoded one by one.
        prompt = getattr(self.decode_step, "prompt", None)
        if prompt is not None:
            return prompt(tokens, positions, cache, last_only)
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
        h = self.norm(x)
        return self.output(h).float() if self.logits is None else self.logits(self.output, h)
