"""Our safetensors reader against the safetensors package's own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamachat.engine import ModelLoadError
from llamachat.engine.weights_reader import read_tensors


def sample_file(path, count: int = 40):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}": torch.randn(3 + i, 5, generator=generator).to(
            (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        )
        for i in range(count)  # more tensors than copies in flight
    }
    tensors["ids"] = torch.arange(7, dtype=torch.int64)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def test_every_tensor_reads_back_as_the_safetensors_package_reads_it(tmp_path):
    path = tmp_path / "model.safetensors"
    sample_file(path)
    expected = load_file(path)
    read = dict(read_tensors(path, torch.device("cpu")))
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)


def test_tensors_are_cast_and_own_their_memory(tmp_path):
    path = tmp_path / "model.safetensors"
    original = sample_file(path, count=3)
    read = dict(read_tensors(path, torch.device("cpu"), torch.float32))
    assert all(t.dtype == torch.float32 for t in read.values())
    read["t0"].add_(1)  # writable: not a view of the read-only mapping
    assert torch.equal(read["t0"], original["t0"] + 1)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) - 10], "bad byte range"),
        (lambda data: data[:4], "not a safetensors file"),
        (lambda data: data[:8] + b"{not json" + data[17:], "unreadable"),
    ],
)
def test_a_damaged_file_is_one_clear_error(tmp_path, damage, message):
    path = tmp_path / "model.safetensors"
    sample_file(path, count=3)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelLoadError, match=message):
        list(read_tensors(path, torch.device("cpu")))
