"""The decode step as CUDA graphs: one capture per attention length, replayed every token.

At batch 1 a decode step is ~400 small kernels (8B shape: 32 layers × a dozen ops); launched
one by one from Python they leave the GPU idle most of the time. A graph replays them all with
one launch. The step's shapes depend only on the attention length (see Transformer.forward),
so the graphs are keyed by it, in powers of two: few captures, and attention never reads more
than twice the cache actually in use.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import Transformer

SMALLEST_SPAN = 256


def graph_span(end: int, capacity: int) -> int:
    """The attention length a step ending at position `end` (exclusive) runs with."""
    span = SMALLEST_SPAN
    while span < end:
        span *= 2
    return min(span, capacity)


class GraphedDecoder:
    def __init__(self, transformer: Transformer, cache: KVCache):
        device = transformer.tok_embeddings.weight.device
        self.transformer = transformer
        self.cache = cache
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # A graph holds raw pointers: keep alive the rotary tables it reads, in case a later
        # session with a longer context replaces them on the model.
        self._tables = (transformer.rope_cos, transformer.rope_sin)
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits (1, 1, V) for `token` at `position`; its keys and values go into the cache."""
        self.token.fill_(token)
        self.position.fill_(position)
        span = graph_span(position + 1, self.cache.max_len)
        if span not in self._graphs:
            self._graphs[span] = self._capture(span)
        graph, logits = self._graphs[span]
        graph.replay()
        return logits

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (cuBLAS picks its kernels, the allocator its blocks).
        # The warm-up runs the very step about to be replayed, so what it writes into the
        # cache is what the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.transformer(self.token, self.position, self.cache, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.transformer(self.token, self.position, self.cache, span)
        return graph, logits
