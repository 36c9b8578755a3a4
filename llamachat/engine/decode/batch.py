"""One token for each of several sequences in one pass (the batch scheduler's step,
engine/batching.py): the projections once for the whole batch, as a matrix product.

- BatchedCpuStep: attention per sequence over exactly its own positions, the arithmetic of
  cpu.CpuDecodeStep, so that a greedy answer is the one the sequence gets alone; a model that
  has the C step (int4 on an x86 CPU) runs that step for each sequence in turn.
- BatchedGpuStep: the session's fused kernels with a row per sequence, each reading and writing
  its own slot of the batch's KV pool, replayed as a CUDA graph per batch size; prompt chunks
  can share a step with the decoding rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..transfer import to_device
from .cpu import _rotation
from .native import NativeDecodeStep

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
        if isinstance(transformer.decode_step, NativeDecodeStep):
            # The C step, one sequence after another: each answer is the one a lone session
            # (the CLI, the app) gets, bit for bit, which PyTorch's arithmetic here would not be.
            step = transformer.decode_step
            rows = [
                step(torch.tensor([[token]]), torch.tensor([position]), cache, cache.max_len)
                for token, cache, position in zip(tokens, caches, positions, strict=True)
            ]
            return torch.cat([row.view(1, -1) for row in rows])
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


@dataclass(frozen=True)
class PromptChunk:
    """Tokens of one sequence's prompt to feed in a batched step, at positions from `start`."""

    slot: int
    start: int
    tokens: list[int]


class BatchedGpuStep:
    """`k_pool`/`v_pool` are (layers, slots, KV, capacity, hd); slot `scratch` is written by
    the rows that pad a batch to its bucket and never read for a real sequence.

    In half precision the step runs the fused kernels (decode/cuda.py) with each row reading
    and writing its own slot, so its shapes depend on the batch size alone: a decode-only step
    replays the CUDA graph of its bucket (powers of two), whatever the sequences' lengths.
    Chunks of prompts can ride along (`mixed`): their rows share the step's matrix products, so
    the weights are read once for both. Elsewhere (float32) attention runs as padded batched
    products over the keys gathered from the pool, eagerly."""

    def __init__(
        self,
        transformer: Transformer,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        scratch: int,
        graphs: bool = True,
    ):
        from . import fused_kernels_fit

        self.transformer = transformer
        self.k_pool, self.v_pool = k_pool, v_pool
        self.scratch = scratch
        self.fused = fused_kernels_fit(transformer)
        self.graphs = graphs and self.fused
        self.rows_per_pack = 1
        if self.fused:
            from ..kernels.cuda.fused import rows_per_pack

            self.rows_per_pack = rows_per_pack(transformer.config.n_groups)
        self._layers = list(zip(k_pool.unbind(0), v_pool.unbind(0), strict=True))
        self._device = k_pool.device
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # A graph holds raw pointers: keep the rotary tables it reads alive.
        self._tables = (transformer.rope_cos, transformer.rope_sin)

    @property
    def captured(self) -> list[int]:
        return sorted(self._captured)

    def capture(self, most: int) -> None:
        """Capture the graph of every bucket up to `most` rows now, rather than on the first
        step of each size (each takes a fraction of a second)."""
        bucket = 1
        while self.graphs:
            if bucket not in self._captured:
                self._captured[bucket] = self._capture(bucket)
            if bucket >= most:
                break
            bucket = _bucket(bucket + 1)

    def __call__(
        self, tokens: list[int] | torch.Tensor, slots: list[int], positions: list[int]
    ) -> torch.Tensor:
        """Float32 logits (B, V); keys and values go into each sequence's slot. The tokens may
        be on the device already (the last step's choice, not yet read back)."""
        size = len(tokens)
        if not self.fused:
            return self._gathered(*self._inputs(tokens, slots, positions, size))
        packs = [(row, 1) for row in range(size)]
        return self._graphed(tokens, slots, positions, packs, list(range(size)))

    def mixed(
        self,
        tokens: list[int] | torch.Tensor,
        slots: list[int],
        positions: list[int],
        chunks: list[PromptChunk],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token of each decoding sequence and the prompt chunks, in one pass (fused only):
        float32 logits (B, V) for the tokens and (C, V) for each chunk's last position. The
        tokens may be on the device already (the last step's choice, not yet read back)."""
        assert self.fused, "prompt chunks ride along on the fused step only"
        rows_tokens, rows_slots, rows_positions = self._rows(tokens, slots, positions, chunks)
        inputs = self._inputs(rows_tokens, rows_slots, rows_positions, len(rows_tokens))
        decoding = len(slots)
        logit_rows = to_device(list(range(decoding)) + _chunk_ends(chunks, decoding), self._device)
        logits = self._fused(*inputs, prompts=chunks, logit_rows=logit_rows)
        return logits[:decoding], logits[decoding:]

    def as_rows(
        self,
        tokens: list[int] | torch.Tensor,
        slots: list[int],
        positions: list[int],
        chunks: list[PromptChunk],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What `mixed` gives, with the prompt rows attending as decoding rows do (to their
        slot's keys up to their own position, written by this step's rows before any reads
        them), a few consecutive ones to an attention program, so that the step's shapes depend
        on its row count alone and it replays the graph of its bucket: a launch of a fraction
        of a millisecond instead of a thousand operations from Python."""
        assert self.fused, "prompt chunks ride along on the fused step only"
        rows_tokens, rows_slots, rows_positions = self._rows(tokens, slots, positions, chunks)
        decoding = len(slots)
        packs = [(row, 1) for row in range(decoding)]
        first = decoding
        for chunk in chunks:
            length = len(chunk.tokens)
            packs += [
                (first + at, min(self.rows_per_pack, length - at))
                for at in range(0, length, self.rows_per_pack)
            ]
            first += length
        logit_rows = list(range(decoding)) + _chunk_ends(chunks, decoding)
        logits = self._graphed(rows_tokens, rows_slots, rows_positions, packs, logit_rows)
        return logits[:decoding], logits[decoding:]

    def _graphed(
        self,
        tokens: list[int] | torch.Tensor,
        slots: list[int],
        positions: list[int],
        packs: list[tuple[int, int]],
        logit_rows: list[int],
    ) -> torch.Tensor:
        """Float32 logits (len(logit_rows), V) of a step whose rows attend in `packs` (first
        row, rows), through the graph of its bucket (or, without graphs, the same arithmetic,
        padding included, launched one by one)."""
        bucket = _bucket(len(tokens))
        index = self._index(slots, positions, packs, logit_rows, bucket)
        padding = bucket - len(tokens)
        if isinstance(tokens, torch.Tensor):
            token_rows = F.pad(tokens, (0, padding))
        else:
            token_rows = to_device(tokens + [0] * padding, self._device)
        if self.graphs:
            if bucket not in self._captured:
                self._captured[bucket] = self._capture(bucket)
            graph, (static_tokens, static_index), logits = self._captured[bucket]
            static_tokens.copy_(token_rows)
            static_index.copy_(index)
            graph.replay()
        else:
            logits = self._fused(token_rows, *self._static_inputs(index))
        wanted = len(logit_rows)
        if logits.shape[0] == bucket and logit_rows[-1] != wanted - 1:  # not the first rows
            return logits.index_select(0, index[4, :wanted])
        return logits[:wanted]

    def _index(
        self,
        slots: list[int],
        positions: list[int],
        packs: list[tuple[int, int]],
        logit_rows: list[int],
        rows: int,
    ) -> torch.Tensor:
        """A graphed step's inputs besides its tokens, (5, rows) on the device in one copy:
        each row's slot and position, the packs' first rows and sizes, and the rows whose
        logits are wanted. Padding rows write the scratch slot, each a pack of its own."""
        real = len(slots)
        padding = list(range(real, rows))
        pack_rows = [first for first, _ in packs] + padding
        pack_sizes = [size for _, size in packs] + [1] * len(padding)
        idle = rows - len(pack_rows)  # rows in packs of several leave pack entries unused
        return to_device(
            [
                slots + [self.scratch] * len(padding),
                positions + [0] * len(padding),
                pack_rows + [0] * idle,
                pack_sizes + [0] * idle,
                logit_rows + [0] * (rows - len(logit_rows)),
            ],
            self._device,
            torch.long,
        )

    def _static_inputs(self, index: torch.Tensor) -> tuple:
        """_fused's arguments after the tokens from a step's index (_index): the logits of
        at most as many rows as there are slots (each row that needs them samples for a slot
        of its own), so that a mixed step's LM head reads only those rows."""
        rows = index.shape[1]
        wanted = min(rows, self.k_pool.shape[1] - 1)
        logit_rows = None if wanted == rows else index[4, :wanted]
        return index[0], index[1], (), logit_rows, (index[2], index[3])

    def _rows(
        self,
        tokens: list[int] | torch.Tensor,
        slots: list[int],
        positions: list[int],
        chunks: list[PromptChunk],
    ) -> tuple[list[int] | torch.Tensor, list[int], list[int]]:
        """A mixed step's rows: the decoding ones', then each chunk's tokens, slot, positions."""
        prompt_tokens = [t for chunk in chunks for t in chunk.tokens]
        rows_tokens: list[int] | torch.Tensor
        if isinstance(tokens, torch.Tensor):
            rows_tokens = torch.cat((tokens, to_device(prompt_tokens, self._device, torch.long)))
        else:
            rows_tokens = tokens + prompt_tokens
        rows_slots = slots + [chunk.slot for chunk in chunks for _ in chunk.tokens]
        rows_positions = positions + [
            p for chunk in chunks for p in range(chunk.start, chunk.start + len(chunk.tokens))
        ]
        return rows_tokens, rows_slots, rows_positions

    def _inputs(
        self, tokens: list[int] | torch.Tensor, slots: list[int], positions: list[int], rows: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        padding = rows - len(tokens)
        if isinstance(tokens, torch.Tensor):
            token_rows = F.pad(tokens, (0, padding))
        else:
            token_rows = to_device(tokens + [0] * padding, self._device)
        return (
            token_rows,
            to_device(slots + [self.scratch] * padding, self._device),
            to_device(positions + [0] * padding, self._device),
        )

    def _capture(self, rows: int):
        static = (
            torch.zeros(rows, dtype=torch.long, device=self._device),
            self._index([], [], [], [], rows),  # every row a padding row of its own
        )
        # Warm up on a side stream (cuBLAS picks its kernels, Triton compiles); every row
        # writes the scratch slot only, so no sequence's cache is touched.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._fused(static[0], *self._static_inputs(static[1]))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._fused(static[0], *self._static_inputs(static[1]))
        return graph, static, logits

    def _fused(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        at: torch.Tensor,
        prompts: Sequence[PromptChunk] = (),
        logit_rows: torch.Tensor | None = None,
        packs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The step through the fused kernels: tokens, slots, positions (R,). Rows past the
        decoding ones belong to the `prompts` chunks, in order, attended by the flash kernel;
        or every row attends as a decoding row does, in `packs` (first rows, sizes)."""
        from ..kernels.cuda.fused import decode_attention, packed_attention
        from .cuda import fused_forward

        transformer = self.transformer
        rows = tokens.shape[0]
        decoding = rows - sum(len(chunk.tokens) for chunk in prompts)
        # From the bucket, not the exact count: each value is a kernel Triton compiles once.
        splits = _attention_chunks(_bucket(max(decoding, 1)), transformer.config.n_kv_heads)

        layout = ChunkLayout.of(prompts, self._device) if prompts else None

        def attend(index: int, q: torch.Tensor, quantize: bool):
            k_pool, v_pool = self._layers[index]
            if packs is not None:
                return packed_attention(q, k_pool, v_pool, at, slots, *packs, splits), None
            parts = []
            if decoding:
                part, _ = decode_attention(
                    q[:decoding], k_pool, v_pool, at[:decoding], splits, False, slots[:decoding]
                )
                parts.append(part)
            if layout is not None:
                parts.append(chunks_attention(q[decoding:], k_pool, v_pool, layout))
            return (torch.cat(parts) if len(parts) > 1 else parts[0]), None

        return fused_forward(
            transformer, tokens, at, self._layers, attend, slots, logit_rows=logit_rows
        )

    def _gathered(
        self, tokens: torch.Tensor, slots: torch.Tensor, at: torch.Tensor
    ) -> torch.Tensor:
        """The step in plain PyTorch (any dtype): each row's keys gathered from the pool up to
        the batch's longest, attention as padded batched products."""
        transformer = self.transformer
        config = transformer.config
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        groups, eps, width = config.n_groups, config.rms_norm_eps, config.intermediate_size
        size = tokens.shape[0]
        span = int(at.max()) + 1
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
            k_pool, v_pool = self._layers[index]  # (slots, KV, cap, hd)
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


def _chunk_ends(chunks: Sequence[PromptChunk], first: int) -> list[int]:
    """The rows of each chunk's last token, the chunks' rows following one another from row
    `first`."""
    return list(itertools.accumulate((len(c.tokens) for c in chunks), initial=first - 1))[1:]


def _bucket(size: int) -> int:
    """The rows a graph runs for `size` rows: the next power of two up to 64, then the next
    multiple of 64 (a mixed step's prompt rows: a power of two would pad 300 rows to 512)."""
    if size <= 64:
        return 1 << (size - 1).bit_length()
    return -(-size // 64) * 64


def _attention_chunks(rows: int, kv_heads: int) -> int:
    """Shares each row's keys are cut into: enough programs to fill the GPU at small batches
    (a lone sequence, 64 shares per kv head, as the session's step), one or two at large."""
    return max(1, min(64, 1024 // (rows * kv_heads)))


@dataclass(frozen=True)
class ChunkLayout:
    """Where a step's prompt chunks lie, for the flash kernel's packed (variable-length) form:
    each chunk's first query row and first key in the packed rows, and the slot and position
    of every packed key in the pool (each chunk's keys from its slot's first position)."""

    query_starts: torch.Tensor  # (C + 1,) int32 on the device
    key_starts: torch.Tensor
    key_slots: torch.Tensor  # (keys,) on the device
    key_positions: torch.Tensor
    longest_chunk: int
    most_keys: int

    @classmethod
    def of(cls, chunks: Sequence[PromptChunk], device: torch.device) -> ChunkLayout:
        lengths = [len(chunk.tokens) for chunk in chunks]
        ends = [chunk.start + length for chunk, length in zip(chunks, lengths, strict=True)]
        slots = [chunk.slot for chunk, end in zip(chunks, ends, strict=True) for _ in range(end)]
        positions = [position for end in ends for position in range(end)]
        return cls(
            to_device(list(itertools.accumulate(lengths, initial=0)), device, torch.int32),
            to_device(list(itertools.accumulate(ends, initial=0)), device, torch.int32),
            to_device(slots, device, torch.long),
            to_device(positions, device, torch.long),
            max(lengths),
            max(ends),
        )


def chunks_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: ChunkLayout
) -> torch.Tensor:
    """Attention of the prompt chunks' queries (T, H, hd), packed one chunk after another,
    each query seeing its slot's keys up to its own position, over one layer's pools (slots,
    KV, capacity, hd): (T, H·hd). One call of the flash kernel for every chunk, its causal
    mask aligned to each chunk's last key; the keys are copied out of the pool packed, as the
    kernel takes them (a few MB a layer), by one gather each: a step's host time goes into
    operations launched one by one, each of which takes Python's lock again. A dense mask had
    the memory-efficient kernel compute all it hid (30% of a 2,048-token chunk's step on an
    H200), and SDPA's own causal path for a chunk runs cuDNN on this card, which plans each
    new shape on the host (benchmarks/mixed_step_probe.py)."""
    length, heads, head_dim = q.shape
    at = (layout.key_slots, slice(None), layout.key_positions)
    out = torch.ops.aten._flash_attention_forward(
        q.contiguous(),
        k_pool[at],  # (keys, KV, hd)
        v_pool[at],
        layout.query_starts,
        layout.key_starts,
        layout.longest_chunk,
        layout.most_keys,
        0.0,
        True,  # causal: for queries fewer than keys, aligned to the last key
        False,
        scale=head_dim**-0.5,
    )[0]
    return out.reshape(length, heads * head_dim)
