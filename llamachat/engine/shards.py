"""Which part of each weight a rank keeps under tensor parallelism (Megatron-LM's split).

Rank r of N keeps query heads [r·H/N, (r+1)·H/N) with the kv heads they read, a slice of
the SwiGLU width and a slice of the vocabulary:

- column-parallel (the output axis split): q/k/v and gate/up; each rank computes its own heads
  and its slice of the hidden width from the whole input;
- row-parallel (the input axis split): o and down; each rank's product is a partial sum, and
  one all-reduce per projection adds them (shard_layers.RowParallel);
- the embedding and LM head split by vocabulary (shard_layers.VocabParallelEmbedding and Head).

kv heads are split when N divides them; with fewer kv heads than ranks (MQA, or 8 kv heads over
16 ranks) each kv head is kept by the N/KV ranks whose queries read it, as vLLM does, so the
KV cache of a rank holds only the kv heads it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import ModelConfig
from .errors import EngineError


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` over the model `config`."""

    config: ModelConfig
    rank: int
    world: int

    @property
    def heads(self) -> int:
        return self.config.n_heads // self.world

    @property
    def kv_heads(self) -> int:
        return max(1, self.config.n_kv_heads // self.world)

    @property
    def first_kv_head(self) -> int:
        # The kv head that this rank's first query head reads; its others follow it.
        return self.rank * self.heads // self.config.n_groups

    @property
    def width(self) -> int:
        return self.config.intermediate_size // self.world

    @property
    def vocab(self) -> int:
        """Rows of the embedding and head a rank keeps: the vocabulary over N, rounded up (the
        last rank's share is padded with zero rows that no token reads)."""
        return -(-self.config.vocab_size // self.world)

    @property
    def first_token(self) -> int:
        return self.rank * self.vocab

    def local_config(self) -> ModelConfig:
        """The shape of this rank's part: a model of its heads, width and vocabulary slice."""
        return replace(
            self.config,
            n_heads=self.heads,
            n_kv_heads=self.kv_heads,
            intermediate_size=self.width,
            vocab_size=self.vocab,
        )

    def take(self, name: str, slot: int, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the checkpoint tensor that fills `slot` of our parameter `name`
        (loading._target_name's names: q, k, v are slots 0-2 of wqkv, gate and up 0-1 of w13)."""
        module, _, kind = name.rpartition(".")
        head_dim = self.config.head_dim
        if module.endswith("attention.wqkv"):
            if slot == 0:
                return _rows(tensor, self.rank * self.heads * head_dim, self.heads * head_dim)
            return _rows(tensor, self.first_kv_head * head_dim, self.kv_heads * head_dim)
        if module.endswith("feed_forward.w13"):
            return _rows(tensor, self.rank * self.width, self.width)
        if module.endswith(("attention.wo", "feed_forward.w2")):
            if kind == "bias":  # added once, after the partial sums are added up
                return tensor if self.rank == 0 else torch.zeros_like(tensor)
            size = self.heads * head_dim if module.endswith("wo") else self.width
            return tensor[:, self.rank * size : (self.rank + 1) * size].contiguous()
        if name in ("tok_embeddings.weight", "output.weight"):
            part = _rows(tensor, self.first_token, self.vocab)
            if part.shape[0] < self.vocab:
                padding = part.new_zeros((self.vocab - part.shape[0], *part.shape[1:]))
                part = torch.cat([part, padding])
            return part
        return tensor  # norms: every rank keeps them whole


def _rows(tensor: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return tensor[start : start + count].contiguous()


def check_world(config: ModelConfig, world: int) -> None:
    """Raise EngineError, naming the numbers, when `world` ranks cannot split this model."""
    if world < 1:
        raise EngineError(f"--gpus must be 1 or more, not {world}")
    if world == 1:
        return
    heads, kv_heads, width = config.n_heads, config.n_kv_heads, config.intermediate_size
    if heads % world:
        raise EngineError(
            f"this model's {heads} attention heads do not split over {world} GPUs: "
            f"use a number that divides {heads}"
        )
    if kv_heads % world and world % kv_heads:
        raise EngineError(
            f"this model's {kv_heads} kv heads do not split over {world} GPUs: use a number "
            f"that divides {kv_heads} or that {kv_heads} divides"
        )
    if width % world:
        raise EngineError(
            f"this model's MLP width {width} does not split over {world} GPUs: "
            f"use a number that divides it"
        )
