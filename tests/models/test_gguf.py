"""GGUF → Hugging Face folder conversion, against transformers' own GGUF loader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llamachat.engine import ModelConfig
from llamachat.engine.rope import inverse_frequencies
from llamachat.models.gguf import ConversionError, _llama3_divisors, _unpermute_rows, convert_gguf


@pytest.mark.smollm2
def test_converted_weights_equal_transformers_gguf_loader_bit_for_bit(
    smollm2_dir, smollm2_reference
):
    from safetensors.torch import load_file

    ours = load_file(smollm2_dir / "model.safetensors")
    reference = smollm2_reference.state_dict()
    assert set(reference) - set(ours) == {"lm_head.weight"}  # tied to the embedding
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name
    assert torch.equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])


@pytest.mark.smollm2
def test_converted_config_matches_transformers_reading(smollm2_dir, smollm2_reference):
    ours = ModelConfig.from_file(smollm2_dir / "config.json")
    theirs = ModelConfig.from_dict(json.loads(smollm2_reference.config.to_json_string()))
    assert ours == theirs
    assert (ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.hidden_size) == (30, 9, 3, 576)


@pytest.mark.smollm2
def test_tokenizer_and_chat_template_come_from_the_metadata(smollm2_gguf, smollm2):
    from gguf import GGUFReader

    fields = GGUFReader(smollm2_gguf).fields
    assert smollm2.tokenizer.chat_template == fields["tokenizer.chat_template"].contents()
    assert len(smollm2.tokenizer) == len(fields["tokenizer.ggml.tokens"].contents())
    assert smollm2.eos_token_ids == {fields["tokenizer.ggml.eos_token_id"].contents()}


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The reordering llama.cpp's converter applies to q/k rows, written from its description:
    per head, rows [0, hd/2) and [hd/2, hd) are interleaved pairwise."""
    head_dim = weight.shape[0] // n_heads
    out = np.empty_like(weight)
    for head in range(n_heads):
        rows = weight[head * head_dim : (head + 1) * head_dim]
        block = out[head * head_dim : (head + 1) * head_dim]
        block[0::2] = rows[: head_dim // 2]
        block[1::2] = rows[head_dim // 2 :]
    return out


def test_unpermute_inverts_llama_cpp_row_order():
    weight = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    assert np.array_equal(_unpermute_rows(llama_cpp_permute(weight, 3), 3), weight)


def test_llama3_rope_table_agrees_with_the_engine_scaling():
    """The converter recognises llama.cpp's per-frequency divisors by the same scheme the engine
    applies: base frequencies divided by them must be the engine's scaled frequencies."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    scaled = inverse_frequencies(ModelConfig.from_dict(raw)).double().numpy()
    base = (
        inverse_frequencies(ModelConfig.from_dict({**raw, "rope_scaling": None})).double().numpy()
    )
    divisors = _llama3_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    assert np.allclose(base / divisors, scaled, rtol=1e-6)
    assert divisors.min() == 1.0 and divisors.max() == 8.0


def test_non_llama_gguf_is_refused_by_architecture(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="'gpt2'"):
        convert_gguf(path, tmp_path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf(path, tmp_path)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_factory, tmp_path_factory) -> Path:
    from tests.models.tiny_gguf import write_tiny_gguf

    folder = tiny_model_factory()[0]
    return write_tiny_gguf(folder, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_the_tiny_gguf_converts(tiny_gguf, tmp_path):
    assert convert_gguf(tiny_gguf, tmp_path) == "Q8_0"


def _cut_points(path: Path) -> list[int]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    size = path.stat().st_size
    first = min(t.data_offset for t in reader.tensors)
    return sorted(
        {0, 3, 4, 8, 16, 23, 24, 100, 1000, 5000, first - 1, first, first + 10, size // 2, size - 1}
    )


def test_a_gguf_cut_anywhere_is_refused_in_one_line(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in _cut_points(tiny_gguf):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        out = tmp_path / f"out-{cut}"
        out.mkdir()
        with pytest.raises(ConversionError) as raised:
            convert_gguf(path, out)
        message = str(raised.value)
        assert "\n" not in message and path.name in message, (cut, message)
        assert "truncated" in message or "not a GGUF file" in message, (cut, message)


@pytest.mark.parametrize(
    "header",
    [
        b"GGUF",
        b"GGUF" + (99).to_bytes(4, "little") + bytes(16),  # a version that does not exist
        b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") + bytes(8),
        b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (2**62).to_bytes(8, "little"),
        b"GGML" + bytes(100),
        bytes(range(256)) * 4,
    ],
)
def test_a_garbage_header_is_refused_in_one_line(tmp_path, header):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(header)
    with pytest.raises(ConversionError) as raised:
        convert_gguf(path, tmp_path)
    assert "\n" not in str(raised.value)


def test_flipped_bytes_in_the_metadata_either_convert_or_are_refused(tiny_gguf, tmp_path):
    """Random damage to the header and metadata (seeded): never anything but ConversionError."""
    from gguf import GGUFReader

    data = tiny_gguf.read_bytes()
    metadata_end = min(t.data_offset for t in GGUFReader(tiny_gguf).tensors)
    chooser = random.Random(10)
    for attempt in range(40):
        damaged = bytearray(data)
        for _ in range(chooser.randint(1, 4)):
            damaged[chooser.randrange(4, metadata_end)] = chooser.randrange(256)
        path = tmp_path / f"flipped-{attempt}.gguf"
        path.write_bytes(damaged)
        out = tmp_path / f"out-{attempt}"
        out.mkdir()
        try:
            convert_gguf(path, out)
        except ConversionError as error:
            assert "\n" not in str(error), str(error)
