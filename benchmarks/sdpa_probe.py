"""What one prompt chunk's attention costs the CPU under each of PyTorch's SDPA backends, over
chunk shapes it has not seen before (a server's prompts nearly always are new shapes): the
probe behind engine/model.py's `masked_attention`, which leaves cuDNN's backend out.

    python benchmarks/sdpa_probe.py      # on a CUDA GPU; Llama-3-8B's attention shape

Each backend runs its own shapes (so no backend finds another's plans cached), every one new
to it; printed per backend: the CPU time of the call (median / most) and, for the same shapes
again, the median once its plans exist.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUPS = HEADS // KV_HEADS
BACKENDS = {
    "default (PyTorch's choice)": None,
    "cuDNN": [SDPBackend.CUDNN_ATTENTION],
    "memory-efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def chunk(length: int, start: int) -> tuple[torch.Tensor, ...]:
    """Queries of a chunk at positions start…start+length, keys and values up to its end, and
    its mask; the query heads that share a kv head stacked along the sequence (as the engine
    does)."""
    end = start + length
    q = torch.randn(1, KV_HEADS, GROUPS * length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(1, KV_HEADS, end, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    at = torch.arange(start, end, device="cuda")
    mask = (torch.arange(end, device="cuda")[None, :] <= at[:, None]).repeat(GROUPS, 1)
    torch.cuda.synchronize()
    return q, keys, values, mask


def attend(inputs: tuple[torch.Tensor, ...], backends) -> None:
    q, keys, values, mask = inputs
    if backends is None:
        F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    else:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def timed(call) -> float:
    began = time.perf_counter()
    call()
    spent = time.perf_counter() - began
    torch.cuda.synchronize()
    return spent


def main() -> None:
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for number, (name, backends) in enumerate(BACKENDS.items()):
        shapes = [(500 + 31 * number + i, 97 * i) for i in range(16)]
        attend(chunk(64, 0), backends)  # the backend's own start-up, not a shape's
        inputs = [chunk(*shape) for shape in shapes]
        new = [timed(lambda i=i, b=backends: attend(i, b)) for i in inputs]
        again = [timed(lambda i=i, b=backends: attend(i, b)) for i in inputs]
        new.sort()
        again.sort()
        print(
            f"{name}: new shapes {1000 * new[len(new) // 2]:.2f} / {1000 * new[-1]:.2f} ms,"
            f" seen shapes {1000 * again[len(again) // 2]:.2f} ms"
        )


if __name__ == "__main__":
    main()
