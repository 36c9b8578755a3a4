"""engine/transfer.py: the array route gives what torch.tensor gives, for every kind of list a
step hands over, and torch.tensor's own answer (or error) for anything else."""

import pytest
import torch

from llamachat.engine.transfer import host_tensor, to_device

LISTS = [
    [1, 2, 3],
    [1.5, 2.0],
    [[1, 2], [3, 4]],
    [[1.0], [2.5]],
    [True, False],
    [],
    [[]],
    [1, 2.5],  # a float among ints
    [2.5, 1],
    [1 << 70],  # beyond int64
    [[1, 2], [3]],  # ragged
    [-(1 << 63), (1 << 63) - 1],
    [[0] * 3] * 2,
]


@pytest.mark.parametrize("values", LISTS, ids=repr)
@pytest.mark.parametrize("dtype", [None, torch.int32, torch.long, torch.float32])
def test_host_tensor_is_torch_tensor(values, dtype):
    try:
        expected = torch.tensor(values, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        with pytest.raises(type(error)):
            host_tensor(values, dtype)
        return
    got = host_tensor(values, dtype)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_the_values_outlive_the_list():
    tensors = [to_device(list(range(i, i + 1000)), torch.device("cpu")) for i in range(20)]
    churn = [list(range(1000)) for _ in range(200)]  # memory the arrays' could be reused for
    assert churn
    for i, tensor in enumerate(tensors):
        assert tensor.tolist() == list(range(i, i + 1000))
