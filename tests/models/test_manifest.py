"""What a manifest says of the weights it records: the GGUF precision they were converted from,
which the default weight format follows."""

from __future__ import annotations

import pytest

from llamachat.models.manifest import Manifest


def manifest(weights: str) -> Manifest:
    return Manifest(
        name="m", source="local", revision=None, files=(), chat_format="model", parameters=1,
        context_length=1, weights=weights,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("weights", "bits"),
    [
        ("float32 (from Q4_1 GGUF)", 4),
        ("float32 (from Q4_K GGUF)", 4),
        ("float32 (from IQ4_XS GGUF)", 4),
        ("float32 (from Q8_0 GGUF)", 8),
        ("float32 (from Q6_K GGUF)", 6),
        ("float32 (from F16 GGUF)", None),  # never quantised: no grid to keep
        ("bfloat16", None),
        ("float16", None),
    ],
)
def test_source_bits_read_the_gguf_type_the_weights_came_from(weights, bits):
    assert manifest(weights).source_bits == bits
