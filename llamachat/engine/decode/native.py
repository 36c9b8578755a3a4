"""The whole decode step of an int4 model on the CPU as one call into C (kernels/cpu/), and a
prompt's rows through the same call.

Each PyTorch operation costs microseconds of overhead however small its work; a step of a
30-layer model is hundreds of them. Here the tokens' embedding rows go in and their logits come
out of one C function that reads the model's own tensors in place (packed int4 weights, norms,
rotary tables, the session's KV cache): nothing is copied, only pointers are passed. A token
decoded is the prompt of one row, so a prompt's keys and values are those of its tokens decoded.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..kernels.cpu import native
from ..kv_cache import KVCache
from ..quantize import Int4Linear, Int8Linear


class NativeDecodeStep:
    """CpuDecodeStep's arithmetic (cpu.py) for a model whose projections are native int4
    layers and whose head is int8; built by `for_model`, which says None where it cannot run."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL):
        config = model.config
        self.lib = lib
        self.embeddings = model.tok_embeddings.weight
        self.vocab_size = config.vocab_size
        self.layers = (native.Layer * config.n_layers)()
        for index, block in enumerate(model.layers):
            attention, feed_forward = block.attention, block.feed_forward
            self.layers[index] = native.Layer(
                _matrix(attention.wqkv),
                _matrix(attention.wo),
                _matrix(feed_forward.w13),
                _matrix(feed_forward.w2),
                block.attention_norm.weight.data_ptr(),
                block.ffn_norm.weight.data_ptr(),
            )
        self.model = native.Model(
            config.hidden_size,
            config.n_layers,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
            config.intermediate_size,
            config.vocab_size,
            config.rms_norm_eps,
            config.head_dim**-0.5,
            self.layers,
            model.norm.weight.data_ptr(),
            model.output.weight.data_ptr(),
            model.output.scale.data_ptr(),
        )
        self.transformer = model
        # The tensors the pointers above point into, kept alive whatever happens to the model.
        self.tensors = [t for m in (model.layers, model.norm, model.output) for t in _tensors(m)]

    @classmethod
    def for_model(cls, model: nn.Module) -> NativeDecodeStep | None:
        """The step for `model` if it has exactly what the C code reads: float32 on the CPU,
        native int4 projections without biases, an int8 head, and widths the kernels take."""
        # Checked before anything touches the library: a model on a GPU, or in another format,
        # neither builds it nor hears that it could not be built.
        config = model.config
        weight = model.tok_embeddings.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return None
        projections = [
            m
            for block in model.layers
            for m in (
                block.attention.wqkv,
                block.attention.wo,
                block.feed_forward.w13,
                block.feed_forward.w2,
            )
        ]
        if not all(
            isinstance(m, Int4Linear) and m.native is not None and m.bias is None
            for m in projections
        ):
            return None
        head = model.output
        if not isinstance(head, Int8Linear) or head.bias is not None:
            return None
        if head.scale.dtype != torch.bfloat16 or config.head_dim % 8:
            return None
        return cls(model, projections[0].native)  # the library the int4 layers loaded

    def prompt(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, last_only: bool
    ) -> torch.Tensor:
        """Logits (1, 1, V), or (1, T, V) unless `last_only`, for a prompt's tokens (1, T) at
        consecutive `positions` (T,), each row computed exactly as this step computes it alone:
        its keys and values are the same however the prompt was cut into calls."""
        count, start = tokens.shape[1], int(positions[0])
        assert positions.tolist() == list(range(start, start + count))
        return self._run(self.embeddings[tokens[0]].contiguous(), start, cache, last_only)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attend_len: int
    ) -> torch.Tensor:
        """Logits (1, 1, V) for the token (1, 1) at `positions` (1,), its keys and values
        written. Attention reads exactly the positions up to this one, whatever attend_len."""
        embedding = self.embeddings[int(tokens[0, 0])]
        return self._run(embedding.view(1, -1), int(positions[0]), cache, last_only=True)

    def _run(
        self, embeddings: torch.Tensor, start: int, cache: KVCache, last_only: bool
    ) -> torch.Tensor:
        """The C prompt_step over rows `embeddings` (T, D) from position `start`."""
        # Each layer's block contiguous and the layers evenly apart: a cache of its own, or one
        # slot of a batch's pool.
        k, v = cache.k, cache.v
        inner = (cache.max_len * k.shape[3], k.shape[3], 1)
        assert k.dtype == v.dtype == torch.float32 and k.stride()[1:] == v.stride()[1:] == inner
        assert k.stride(0) == v.stride(0)
        count = embeddings.shape[0]
        logits = torch.empty(1 if last_only else count, self.vocab_size)
        status = self.lib.prompt_step(
            ctypes.byref(self.model),
            embeddings.data_ptr(),
            start,
            count,
            k.data_ptr(),
            v.data_ptr(),
            cache.max_len,
            k.stride(0),
            self.transformer.rope_cos.data_ptr(),
            self.transformer.rope_sin.data_ptr(),
            logits.data_ptr(),
            0 if last_only else 1,
            torch.get_num_threads(),  # what threads.py chose for this reply
        )
        if status != 0:
            raise MemoryError("the native step could not allocate its scratch memory")
        return logits.unsqueeze(0)


def _matrix(linear: Int4Linear) -> native.Int4Matrix:
    return native.int4_matrix(linear.weight, linear.scale, linear.offset)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
