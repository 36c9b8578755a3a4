"""The layers of a tensor-parallel rank's part of the model that talk to the other ranks
(torch.distributed): the two row-parallel projections of each block, the embedding and the LM
head. Below decode/ and parallel/, which both use them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .shards import Shard

if TYPE_CHECKING:
    from .decode import Logits
    from .model import Transformer


class RowParallel(nn.Module):
    """A projection whose input axis is split over the ranks (o, down): each rank's product is
    a partial sum of the whole one; an all-reduce adds them up on every rank."""

    def __init__(self, local: nn.Module):
        super().__init__()
        self.local = local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.local(x))

    @staticmethod
    def reduce(out: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums `out` → the whole product's, on every rank."""
        dist.all_reduce(out)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [first, first + V/N) of the embedding: a token outside them looks up zeros, and the
    all-reduce adds the one rank's row to the others' zeros (exactly: x + 0 = x)."""

    def __init__(self, weight: torch.Tensor, first: int):
        super().__init__()
        self.weight = weight  # loading's parameter, as Transformer.tok_embeddings has it
        self.first = first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.first
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = rows * inside[..., None].to(rows.dtype)
        dist.all_reduce(out)
        return out


class VocabParallelHead(nn.Module):
    """The LM head's rows for this rank's vocabulary slice: each rank writes its float32 logits
    and an all-gather puts the whole row, in vocabulary order, on every rank."""

    def __init__(self, local: nn.Module, vocab_size: int, world: int, logits: Logits | None):
        super().__init__()
        self.local = local
        self.vocab_size = vocab_size
        self.world = world
        self.logits = logits  # the device's way to float32 logits (decode.choose_logits)

    @property
    def weight(self) -> torch.Tensor:
        return self.local.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        part = self.local(h).float() if self.logits is None else self.logits(self.local, h)
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(parts, part)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def parallelize(transformer: Transformer, shard: Shard, logits: Logits | None) -> None:
    """Wire a rank's part (loaded with `shard`) to the other ranks: its row-parallel
    projections, embedding and head. Its `logits` are then the whole vocabulary's, in float32."""
    for layer in transformer.layers:
        layer.attention.wo = RowParallel(layer.attention.wo)
        layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2)
    transformer.tok_embeddings = VocabParallelEmbedding(
        transformer.tok_embeddings.weight, shard.first_token
    )
    transformer.output = VocabParallelHead(
        transformer.output, shard.config.vocab_size, shard.world, logits
    )
    transformer.logits = None  # the head's output is float32 already
