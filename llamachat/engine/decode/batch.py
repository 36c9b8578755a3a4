"""One token for each of several sequences in one pass (the batch scheduler's step,
engine/batching.py): the projections once for the whole batch, as a matrix product.

- BatchedCpuStep: attention per sequence over exactly its own positions, the arithmetic of
  cpu.CpuDecodeStep, so that a greedy answer is the one the sequence gets alone.
- BatchedGpuStep: attention as padded batched products, the cache written and read with one
  indexing operation per layer over the batch's shared KV pool, and the whole step replayed as
  a CUDA graph per (batch size, attention length) bucket: a GPU pays for each launch, not for
  the padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..cuda_graphs import graph_span
from .cpu import _rotation

if TYPE_CHECKING:
    from ..kv_cache import KVCache
    from ..model import Transformer


class BatchedCpuStep:
    def __init__(self, transformer: Transformer):
        self.transformer = transformer

    def __call__(
        self, tokens: list[int], caches: list[KVCache], positions: list[int]
    ) -> torch.Tensor:
        """Float32 logits (B, V); each token's keys and values go into its own cache."""
        transformer = self.transformer
        config = transformer.config
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        groups, eps, width = config.n_groups, config.rms_norm_eps, config.intermediate_size
        device = transformer.tok_embeddings.weight.device
        dtype = caches[0].k.dtype
        rotations = torch.stack(
            [_rotation(transformer.rope_cos[p], transformer.rope_sin[p]) for p in positions]
        ).to(dtype)  # (B, hd, hd)
        x = transformer.tok_embeddings(torch.tensor(tokens, device=device))  # (B, D)
        shape = x.shape[-1:]
        for index, layer in enumerate(transformer.layers):
            h = F.rms_norm(x, shape, layer.attention_norm.weight, eps)
            qkv = layer.attention.wqkv(h).view(len(tokens), heads + 2 * kv_heads, head_dim)
            qk = torch.bmm(qkv[:, : heads + kv_heads], rotations)  # (B, H + KV, hd), rotated
            attended = []
            for row, (cache, position) in enumerate(zip(caches, positions, strict=True)):
                keys, values = cache.layers[index]
                keys[:, position] = qk[row, heads:]
                values[:, position] = qkv[row, heads + kv_heads :]
                q = qk[row, :heads].view(kv_heads, groups, head_dim)
                seen_keys, seen_values = keys[:, : position + 1], values[:, : position + 1]
                scores = torch.bmm(q, seen_keys.transpose(1, 2)).mul_(head_dim**-0.5)
                attended.append(torch.bmm(torch.softmax(scores, dim=-1), seen_values).flatten())
            x = x + layer.attention.wo(torch.stack(attended))
            h = F.rms_norm(x, shape, layer.ffn_norm.weight, eps)
            gate_up = layer.feed_forward.w13(h)
            x = x + layer.feed_forward.w2(F.silu(gate_up[:, :width]) * gate_up[:, width:])
        return transformer.output(transformer.norm(x)).float()


class BatchedGpuStep:
    """`k_pool`/`v_pool` are (layers, slots, KV, capacity, hd); slot `scratch` is written by
    the rows that pad a batch to its bucket and never read for a real sequence."""

    def __init__(
        self,
        transformer: Transformer,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        scratch: int,
        graphs: bool = True,
    ):
        self.transformer = transformer
        self.k_pool, self.v_pool = k_pool, v_pool
        self.scratch = scratch
        self.capacity = k_pool.shape[3]
        self.graphs = graphs
        device = k_pool.device
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._device = device
        # A graph holds raw pointers: keep the rotary tables it reads alive.
        self._tables = (transformer.rope_cos, transformer.rope_sin)

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._captured)

    def __call__(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        """Float32 logits (B, V); keys and values go into each sequence's slot."""
        size = len(tokens)
        span = graph_span(max(positions) + 1, self.capacity)
        if not self.graphs:
            inputs = self._inputs(tokens, slots, positions, size)
            return self.forward(*inputs, span)
        bucket = 1 << (size - 1).bit_length()  # the next power of two
        key = (bucket, span)
        if key not in self._captured:
            self._captured[key] = self._capture(bucket, span)
        graph, static, logits = self._captured[key]
        given = self._inputs(tokens, slots, positions, bucket)
        for target, values in zip(static, given, strict=True):
            target.copy_(values)
        graph.replay()
        return logits[:size]

    def _inputs(
        self, tokens: list[int], slots: list[int], positions: list[int], rows: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        padding = rows - len(tokens)
        values = (
            tokens + [0] * padding,
            slots + [self.scratch] * padding,
            positions + [0] * padding,
        )
        return tuple(torch.tensor(v, device=self._device) for v in values)  # type: ignore[return-value]

    def _capture(self, rows: int, span: int):
        static = (
            torch.zeros(rows, dtype=torch.long, device=self._device),
            torch.full((rows,), self.scratch, dtype=torch.long, device=self._device),
            torch.zeros(rows, dtype=torch.long, device=self._device),
        )
        # Warm up on a side stream (cuBLAS picks its kernels); every row writes the scratch
        # slot only, so no sequence's cache is touched.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(*static, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(*static, span)
        return graph, static, logits

    def forward(
        self, tokens: torch.Tensor, slots: torch.Tensor, at: torch.Tensor, span: int
    ) -> torch.Tensor:
        """The step on tensors alone (what a graph captures): tokens, slots, positions (B,)."""
        transformer = self.transformer
        config = transformer.config
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        groups, eps, width = config.n_groups, config.rms_norm_eps, config.intermediate_size
        size = tokens.shape[0]
        dtype = self.k_pool.dtype
        hidden = torch.arange(span, device=at.device)[None, :] > at[:, None]  # (B, S)
        bias = torch.zeros(hidden.shape, device=at.device).masked_fill_(hidden, float("-inf"))
        bias = bias[:, None, None, :]  # (B, 1, 1, S): every kv head and query alike
        cos = transformer.rope_cos[at][:, None].to(dtype)  # (B, 1, hd)
        sin = transformer.rope_sin[at][:, None].to(dtype)
        half = head_dim // 2
        x = transformer.tok_embeddings(tokens)
        shape = x.shape[-1:]
        for index, layer in enumerate(transformer.layers):
            h = F.rms_norm(x, shape, layer.attention_norm.weight, eps)
            qkv = layer.attention.wqkv(h).view(size, heads + 2 * kv_heads, head_dim)
            qk = qkv[:, : heads + kv_heads]
            turned = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + turned * sin  # (B, H + KV, hd), rotated
            k_pool, v_pool = self.k_pool[index], self.v_pool[index]  # (slots, KV, cap, hd)
            k_pool[slots, :, at] = qk[:, heads:]
            v_pool[slots, :, at] = qkv[:, heads + kv_heads :]
            keys, values = k_pool[slots, :, :span], v_pool[slots, :, :span]  # (B, KV, S, hd)
            q = qk[:, :heads].reshape(size, kv_heads, groups, head_dim)
            scores = torch.matmul(q * head_dim**-0.5, keys.transpose(-1, -2)) + bias
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
            attended = torch.matmul(probs, values).reshape(size, heads * head_dim)
            x = x + layer.attention.wo(attended)
            h = F.rms_norm(x, shape, layer.ffn_norm.weight, eps)
            gate_up = layer.feed_forward.w13(h)
            x = x + layer.feed_forward.w2(F.silu(gate_up[:, :width]) * gate_up[:, width:])
        return transformer.output(transformer.norm(x)).float()
