"""Fused Triton kernels for the one-token decode step (CUDA).

Besides its four matrix products a LLaMA block runs some twenty small operations per token
(norms, rotary embedding, cache writes, the attention's scores, mask, softmax, weighted sum,
residual adds, SiLU). Each is a kernel that moves a few kilobytes and costs ~3 µs however
little it does: at 32 layers that is ~2 ms a token, a third of the whole step on an H100.
These kernels do the same work in six launches a block, for one row (a session's token) or
many (one token of each sequence in a batch, whose caches are slots of one pool):

- `add_rms_norm`: residual add and the next RMSNorm in one pass;
- `rope_and_cache`: rotates queries and keys, writes keys and values into the cache slot;
- `decode_attention`: flash-decoding: the keys are cut into chunks, each chunk's softmax
  partials are computed in parallel (only up to the real position: cost follows the context
  in use, not the graph's span), then combined; `packed_attention` the same for a batch
  whose prompt rows come several to a program, reading their keys once;
- `silu_mul`: SwiGLU's gate.

`add_rms_norm`, `silu_mul` and `decode_attention` can also write their output rounded to int8
in groups of 32, the input an int4 or int8 layer's kernel multiplies (gemv.py, activations.py),
saving a launch of its own. Inside a CUDA graph on a Hopper GPU each kernel starts with a
programmatic-dependent-launch wait (launch.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import Int8Activations, int8_activations, store_int8_groups
from .launch import await_previous_kernel, launch_options


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    delta_ptr,
    weight_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    sum_ptr,
    eps,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    QUANTIZE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Program r: row r.
    await_previous_kernel(PDL)
    at = tl.arange(0, BLOCK)
    ok = at < D
    row = tl.program_id(0).to(tl.int64) * D
    x_ptr += row
    delta_ptr += row
    normed_ptr += row
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(delta_ptr + at, mask=ok, other=0.0).to(tl.float32)
    x = x.to(x_ptr.dtype.element_ty)  # the residual stream keeps the activation dtype
    tl.store(x_ptr + at, x, mask=ok)
    x = x.to(tl.float32)
    inverse = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    weight = tl.load(weight_ptr + at, mask=ok, other=0.0).to(tl.float32)
    normed = (x * inverse * weight).to(normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + at, normed, mask=ok)
    if QUANTIZE:
        store_int8_groups(normed.to(tl.float32), 0, q_ptr, scale_ptr, sum_ptr, D, BLOCK)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool
) -> tuple[torch.Tensor, Int8Activations | None]:
    """x += delta (in place, the residual stream) and return rms_norm(x) · weight, each (R, D);
    with `quantize` (one row only) also the row rounded to int8 in groups of 32."""
    normed = torch.empty_like(x)
    rows, d = x.shape
    assert rows == 1 or not quantize, "int8 rounding is for one row"
    rounded = int8_activations(d, x.device) if quantize else None
    _add_rms_norm_kernel[(rows,)](
        x, delta, weight, normed, *(rounded or (normed, normed, normed)), eps, d,
        triton.next_power_of_2(d), QUANTIZE=quantize, num_warps=8, **launch_options(),
    )  # fmt: skip
    return normed, rounded


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    position_ptr,
    slot_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    max_len,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SLOTTED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Program (head, row): one head of row's fused qkv: HEADS query heads, then KV_HEADS keys,
    # then KV_HEADS values. Half-split rotation: out = x·cos + rotate_half(x)·sin. SLOTTED: the
    # caches are a pool of slots (slots, KV, max_len, hd) and the row's slot is at slot_ptr.
    await_previous_kernel(PDL)
    head = tl.program_id(0)
    row = tl.program_id(1)
    position = tl.load(position_ptr + row)
    width: tl.constexpr = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv_ptr += row.to(tl.int64) * width
    q_ptr += row.to(tl.int64) * HEADS * HEAD_DIM
    if SLOTTED:
        slot = tl.load(slot_ptr + row).to(tl.int64)
        k_cache_ptr += slot * KV_HEADS * max_len * HEAD_DIM
        v_cache_ptr += slot * KV_HEADS * max_len * HEAD_DIM
    half: tl.constexpr = HEAD_DIM // 2
    low = tl.arange(0, half)
    x_low = tl.load(qkv_ptr + head * HEAD_DIM + low)
    x_high = tl.load(qkv_ptr + head * HEAD_DIM + half + low)
    if head < HEADS + KV_HEADS:
        # The tables hold each angle twice (both halves equal): read the first half.
        cos = tl.load(cos_ptr + position * HEAD_DIM + low)
        sin = tl.load(sin_ptr + position * HEAD_DIM + low)
        a = x_low.to(tl.float32)
        b = x_high.to(tl.float32)
        dtype = q_ptr.dtype.element_ty
        out_low = (a * cos - b * sin).to(dtype)
        out_high = (b * cos + a * sin).to(dtype)
        if head < HEADS:
            tl.store(q_ptr + head * HEAD_DIM + low, out_low)
            tl.store(q_ptr + head * HEAD_DIM + half + low, out_high)
        else:
            at = ((head - HEADS) * max_len + position) * HEAD_DIM
            tl.store(k_cache_ptr + at + low, out_low)
            tl.store(k_cache_ptr + at + half + low, out_high)
    else:
        at = ((head - HEADS - KV_HEADS) * max_len + position) * HEAD_DIM
        tl.store(v_cache_ptr + at + low, x_low)
        tl.store(v_cache_ptr + at + half + low, x_high)


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated queries (R, heads, hd) from qkv (R, (heads + 2·kv)·hd); each row's rotated key
    and value go into k_cache/v_cache at its position (`position` (R,)). The caches are
    (kv, max_len, hd), or with `slots` (R,) a pool (slots, kv, max_len, hd) and row r writes
    slot slots[r]."""
    kv_heads, max_len, head_dim = k_cache.shape[-3:]
    rows = qkv.shape[0]
    q = torch.empty((rows, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    grid = (heads + 2 * kv_heads, rows)
    _rope_and_cache_kernel[grid](
        qkv, cos, sin, position, position if slots is None else slots, q, k_cache, v_cache,
        max_len, heads, kv_heads, head_dim, slots is not None, **launch_options(),
    )  # fmt: skip
    return q


@triton.jit
def _attention_chunk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    position_ptr,
    slot_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    max_len,
    scale,
    CHUNKS,
    KV_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    SLOTTED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Program (kv head, chunk, row): the GROUPS query heads of `row` that share this kv head,
    # against the chunk-th of CHUNKS equal shares (whole BLOCKs) of the keys [0, position],
    # with an online softmax; writes the unnormalised weighted sum of values, the running max
    # and the sum of exponentials. Keys past the position are never read, so the cost follows
    # the context in use, whatever the number of chunks.
    await_previous_kernel(PDL)
    kv_head = tl.program_id(0)
    chunk = tl.program_id(1)
    row = tl.program_id(2)
    position = tl.load(position_ptr + row)
    q_ptr += row.to(tl.int64) * KV_HEADS * GROUPS * HEAD_DIM
    if SLOTTED:
        slot = tl.load(slot_ptr + row).to(tl.int64)
        k_ptr += slot * KV_HEADS * max_len * HEAD_DIM
        v_ptr += slot * KV_HEADS * max_len * HEAD_DIM
    rows = tl.arange(0, GROUPS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUPS
    q = tl.load(
        q_ptr + (kv_head * GROUPS + rows[:, None]) * HEAD_DIM + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    running_max = tl.full((GROUPS_PAD,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((GROUPS_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUPS_PAD, HEAD_DIM), dtype=tl.float32)
    share = ((position + CHUNKS) // CHUNKS + BLOCK - 1) // BLOCK * BLOCK  # whole blocks
    first = chunk * share
    last = tl.minimum(first + share, position + 1)
    base = kv_head.to(tl.int64) * max_len * HEAD_DIM
    for start in range(first, last, BLOCK):
        keys_at = start + tl.arange(0, BLOCK)
        key_ok = keys_at < last
        k = tl.load(
            k_ptr + base + keys_at[:, None] * HEAD_DIM + dims[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k)) * scale  # (GROUPS_PAD, BLOCK)
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        v = tl.load(
            v_ptr + base + keys_at[:, None] * HEAD_DIM + dims[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )
        acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v)
        running_max = new_max
    out = ((row * KV_HEADS + kv_head) * CHUNKS + chunk) * GROUPS + rows
    tl.store(acc_ptr + out[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(max_ptr + out, running_max, mask=row_ok)
    tl.store(sum_ptr + out, running_sum, mask=row_ok)


@triton.jit
def _packed_attention_chunk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    position_ptr,
    slot_ptr,
    pack_row_ptr,
    pack_size_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    max_len,
    scale,
    CHUNKS,
    KV_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Program (kv head, chunk, pack): what _attention_chunk_kernel does for one row, for the
    # pack's rows at once: pack_size rows from pack_row on, of one slot at consecutive
    # positions (a prompt's tokens), their GROUPS query heads each filling one tile of TILE
    # query rows, so the pack's keys are read once instead of once a row. Each tile row sees
    # the keys up to its own position. A pack of size 0 is padding and does nothing.
    await_previous_kernel(PDL)
    kv_head = tl.program_id(0)
    chunk = tl.program_id(1)
    pack = tl.program_id(2)
    size = tl.load(pack_size_ptr + pack)
    if size > 0:
        first_row = tl.load(pack_row_ptr + pack)
        first_position = tl.load(position_ptr + first_row)
        last_position = first_position + size - 1
        slot = tl.load(slot_ptr + first_row).to(tl.int64)
        k_ptr += slot * KV_HEADS * max_len * HEAD_DIM
        v_ptr += slot * KV_HEADS * max_len * HEAD_DIM
        tile = tl.arange(0, TILE)
        offset = tile // GROUPS  # the tile row's row within the pack, and its query head
        head = tile % GROUPS
        tile_ok = offset < size
        row = (first_row + offset).to(tl.int64)
        sees = first_position + offset  # the last key the tile row attends to
        dims = tl.arange(0, HEAD_DIM)
        query = (row * KV_HEADS + kv_head) * GROUPS + head
        q = tl.load(
            q_ptr + query[:, None] * HEAD_DIM + dims[None, :],
            mask=tile_ok[:, None],
            other=0.0,
        )
        running_max = tl.full((TILE,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((TILE,), dtype=tl.float32)
        acc = tl.zeros((TILE, HEAD_DIM), dtype=tl.float32)
        share = ((last_position + CHUNKS) // CHUNKS + BLOCK - 1) // BLOCK * BLOCK
        first = chunk * share
        last = tl.minimum(first + share, last_position + 1)
        base = kv_head.to(tl.int64) * max_len * HEAD_DIM
        for start in range(first, last, BLOCK):
            keys_at = start + tl.arange(0, BLOCK)
            key_ok = keys_at < last
            k = tl.load(
                k_ptr + base + keys_at[:, None] * HEAD_DIM + dims[None, :],
                mask=key_ok[:, None],
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k)) * scale  # (TILE, BLOCK)
            seen = key_ok[None, :] & (keys_at[None, :] <= sees[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # A tile row may see no key of this block (an earlier position): keep its sums 0
            # rather than exp(-inf - -inf).
            finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            correction = tl.exp(running_max - finite_max)
            weights = tl.exp(scores - finite_max[:, None])
            running_sum = running_sum * correction + tl.sum(weights, axis=1)
            v = tl.load(
                v_ptr + base + keys_at[:, None] * HEAD_DIM + dims[None, :],
                mask=key_ok[:, None],
                other=0.0,
            )
            acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v)
            running_max = new_max
        out = ((row * KV_HEADS + kv_head) * CHUNKS + chunk) * GROUPS + head
        tl.store(acc_ptr + out[:, None] * HEAD_DIM + dims[None, :], acc, mask=tile_ok[:, None])
        tl.store(max_ptr + out, running_max, mask=tile_ok)
        tl.store(sum_ptr + out, running_sum, mask=tile_ok)


@triton.jit
def _attention_combine_kernel(
    acc_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    q_ptr,
    scale_ptr,
    rounded_sum_ptr,
    WIDTH,
    KV_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNKS: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    QUANTIZE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Program (kv head, group, row): rescale every chunk's partials to the overall max and
    # divide. A chunk that held no key has max -inf and weighs 0.
    await_previous_kernel(PDL)
    kv_head = tl.program_id(0)
    group = tl.program_id(1)
    row = tl.program_id(2)
    chunks = tl.arange(0, CHUNKS_PAD)
    chunk_ok = chunks < CHUNKS
    dims = tl.arange(0, HEAD_DIM)
    at = ((row * KV_HEADS + kv_head) * CHUNKS + chunks) * GROUPS + group
    maxima = tl.load(max_ptr + at, mask=chunk_ok, other=float("-inf"))
    overall = tl.max(maxima, axis=0)  # finite: chunk 0 always holds key 0
    factors = tl.exp(maxima - overall)  # 0 for chunks past the position
    total = tl.sum(tl.load(sum_ptr + at, mask=chunk_ok, other=0.0) * factors, axis=0)
    acc = tl.load(
        acc_ptr + at[:, None] * HEAD_DIM + dims[None, :], mask=chunk_ok[:, None], other=0.0
    )
    out = (tl.sum(acc * factors[:, None], axis=0) / total).to(out_ptr.dtype.element_ty)
    first = (kv_head * GROUPS + group) * HEAD_DIM
    tl.store(out_ptr + row.to(tl.int64) * WIDTH + first + dims, out)
    if QUANTIZE:  # a head is whole groups of 32 (HEAD_DIM a multiple of 32)
        store_int8_groups(
            out.to(tl.float32), first, q_ptr, scale_ptr, rounded_sum_ptr, WIDTH, HEAD_DIM
        )


def attention_chunks(span: int) -> int:
    """Chunks for one row's attention over up to `span` keys: at most 64, of at least 64 keys."""
    return triton.cdiv(span, max(64, triton.cdiv(span, 64)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: torch.Tensor,
    chunks: int,
    quantize: bool,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Int8Activations | None]:
    """Attention of each row's queries (R, heads, hd) over its cached keys [0, position[r]],
    the keys cut into `chunks` shares computed in parallel: (R, heads·hd), and with `quantize`
    (one row only) the same rounded to int8 in groups of 32 (when a head is whole groups; else
    None). Query head h reads kv head h // (heads / kv_heads). The caches are (kv, max_len, hd),
    or with `slots` (R,) a pool (slots, kv, max_len, hd) and row r reads slot slots[r]."""
    rows, heads, head_dim = q.shape
    kv_heads, max_len, _ = k_cache.shape[-3:]
    groups = heads // kv_heads
    partial_acc = torch.empty(
        (rows, kv_heads, chunks, groups, head_dim), dtype=torch.float32, device=q.device
    )
    partial_max = torch.empty(
        (rows, kv_heads, chunks, groups), dtype=torch.float32, device=q.device
    )
    partial_sum = torch.empty_like(partial_max)
    _attention_chunk_kernel[(kv_heads, chunks, rows)](
        q, k_cache, v_cache, position, position if slots is None else slots, partial_acc,
        partial_max, partial_sum, max_len, head_dim**-0.5, chunks, kv_heads, groups,
        max(16, triton.next_power_of_2(groups)), head_dim, 64, slots is not None, num_warps=4,
        **launch_options(),
    )  # fmt: skip
    out = torch.empty((rows, heads * head_dim), dtype=q.dtype, device=q.device)
    assert rows == 1 or not quantize, "int8 rounding is for one row"
    quantize = quantize and head_dim % 32 == 0
    rounded = int8_activations(heads * head_dim, q.device) if quantize else None
    _attention_combine_kernel[(kv_heads, groups, rows)](
        partial_acc, partial_max, partial_sum, out, *(rounded or (out, out, out)),
        heads * head_dim, kv_heads, groups, head_dim, chunks, triton.next_power_of_2(chunks),
        QUANTIZE=quantize, num_warps=2, **launch_options(),
    )  # fmt: skip
    return out, rounded


def pack_tile(groups: int) -> int:
    """Query rows of one packed attention program: the decode kernel's (at least 16, for the
    tensor cores)."""
    return max(16, triton.next_power_of_2(groups))


def rows_per_pack(groups: int) -> int:
    """Rows of one slot's prompt at consecutive positions that one packed attention program
    takes (packed_attention): as many as the tile holds with their query heads."""
    return pack_tile(groups) // groups


def packed_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    position: torch.Tensor,
    slots: torch.Tensor,
    pack_rows: torch.Tensor,
    pack_sizes: torch.Tensor,
    chunks: int,
) -> torch.Tensor:
    """decode_attention over a pool (R, heads·hd), with the rows in packs: pack p is the
    pack_sizes[p] rows from pack_rows[p] on (0 rows: padding), which share a slot and sit at
    consecutive positions, each row attending to its slot's keys up to its own position, and
    the pack reads those keys once. A decoding row is a pack of its own; a prompt's rows come
    rows_per_pack to a pack."""
    rows, heads, head_dim = q.shape
    kv_heads, max_len, _ = k_pool.shape[-3:]
    groups = heads // kv_heads
    partial_acc = torch.empty(
        (rows, kv_heads, chunks, groups, head_dim), dtype=torch.float32, device=q.device
    )
    partial_max = torch.empty(
        (rows, kv_heads, chunks, groups), dtype=torch.float32, device=q.device
    )
    partial_sum = torch.empty_like(partial_max)
    _packed_attention_chunk_kernel[(kv_heads, chunks, pack_rows.shape[0])](
        q, k_pool, v_pool, position, slots, pack_rows, pack_sizes, partial_acc, partial_max,
        partial_sum, max_len, head_dim**-0.5, chunks, kv_heads, groups, pack_tile(groups),
        head_dim, 64, num_warps=4, **launch_options(),
    )  # fmt: skip
    out = torch.empty((rows, heads * head_dim), dtype=q.dtype, device=q.device)
    _attention_combine_kernel[(kv_heads, groups, rows)](
        partial_acc, partial_max, partial_sum, out, out, out, out, heads * head_dim, kv_heads,
        groups, head_dim, chunks, triton.next_power_of_2(chunks), QUANTIZE=False, num_warps=2,
        **launch_options(),
    )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, out_ptr, q_ptr, scale_ptr, sum_ptr, WIDTH, BLOCK: tl.constexpr,
    QUANTIZE: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    # Program (block, row).
    await_previous_kernel(PDL)
    first = tl.program_id(0) * BLOCK
    row = tl.program_id(1).to(tl.int64)
    gate_up_ptr += row * 2 * WIDTH
    out_ptr += row * WIDTH
    at = first + tl.arange(0, BLOCK)
    ok = at < WIDTH
    gate = tl.load(gate_up_ptr + at, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + WIDTH + at, mask=ok, other=0.0).to(tl.float32)
    out = (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + at, out, mask=ok)
    if QUANTIZE:
        store_int8_groups(out.to(tl.float32), first, q_ptr, scale_ptr, sum_ptr, WIDTH, BLOCK)


def silu_mul(gate_up: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, Int8Activations | None]:
    """silu(gate) · up for each row of gate_up (R, 2·I) = [gate | up]: (R, I), and with
    `quantize` (one row only) the same rounded to int8 in groups of 32."""
    rows, width = gate_up.shape[0], gate_up.shape[-1] // 2
    assert rows == 1 or not quantize, "int8 rounding is for one row"
    out = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
    rounded = int8_activations(width, gate_up.device) if quantize else None
    _silu_mul_kernel[(triton.cdiv(width, 1024), rows)](
        gate_up, out, *(rounded or (out, out, out)), width, BLOCK=1024, QUANTIZE=quantize,
        **launch_options(),
    )  # fmt: skip
    return out, rounded
