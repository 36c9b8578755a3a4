"""Tensor parallelism on the CPU: N processes over gloo give one process's logits and greedy
tokens (float32), for MHA, GQA and MQA models and for SmolLM2 (9 heads over 3 kv heads, 3
processes). The same code runs over NCCL with a process per GPU."""

from __future__ import annotations

import pytest
import torch

from llamachat.engine import GREEDY, ChatModel, EngineError
from llamachat.engine.shards import Shard, check_world

PROMPT = [5, 17, 33, 2, 90, 61, 7, 250, 14, 3, 101, 44, 180, 9, 75, 12, 300, 8]
STEPS = [31, 64, 128, 7, 200]


def run(model: ChatModel) -> torch.Tensor:
    """The prompt's last logits and those of five decode steps after it, (6, V)."""
    session = model.session(ctx=512)
    with torch.inference_mode():
        rows = [session._forward(PROMPT)] + [session._forward([token]) for token in STEPS]
    return torch.cat([row.view(1, -1) for row in rows])


def greedy(model: ChatModel, tokens: int = 24) -> list[int]:
    session, chosen = model.session(ctx=512), []
    with torch.inference_mode():
        logits = session._forward(PROMPT)
        for _ in range(tokens):
            chosen.append(int(logits[0, -1].argmax()))
            logits = session._forward(chosen[-1:])
    return chosen


SHAPES = {
    "MHA": dict(num_attention_heads=4, num_key_value_heads=4),
    "GQA": dict(num_attention_heads=8, num_key_value_heads=2),
    # One kv head, kept by every rank; a vocabulary that 4 does not divide (the last rank's
    # share of the head is padded).
    "MQA": dict(num_attention_heads=8, num_key_value_heads=1, vocab_size=390),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_ranks_over_gloo_give_one_process_logits_and_greedy_tokens(
    tiny_model_factory, shape, world
):
    folder, _ = tiny_model_factory(**SHAPES[shape])
    alone = ChatModel.load(folder, device="cpu", dtype="float32")
    expected, expected_tokens = run(alone), greedy(alone)
    model = ChatModel.load(folder, device="cpu", dtype="float32", gpus=world)
    try:
        assert model.gpus == world
        got, tokens = run(model), greedy(model)
    finally:
        model.close()
    assert got.shape == expected.shape  # the whole vocabulary, padding cut off
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert tokens == expected_tokens
    # Each rank's cache holds only its kv heads: rank 0's share of them here.
    assert model.transformer.config.n_kv_heads == max(
        1, SHAPES[shape]["num_key_value_heads"] // world
    )


def test_the_other_ranks_exit_when_the_model_is_closed(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder, device="cpu", dtype="float32", gpus=2)
    run(model)
    processes = model.transformer.leader._processes
    model.close()
    assert [process.returncode for process in processes] == [0]
    with pytest.raises(EngineError, match="stopped"):
        run(model)
    # The process group is free again: another model can be split.
    again = ChatModel.load(folder, device="cpu", dtype="float32", gpus=2)
    again.close()


def test_int8_shards_keep_int8s_accuracy(tiny_model_factory):
    """Each rank quantises its own part: o and down are split along their input, so their
    per-row scales are a part's, not the whole row's; the answer stays as close to float32."""
    folder, _ = tiny_model_factory()
    expected = run(ChatModel.load(folder, device="cpu", dtype="float32"))
    model = ChatModel.load(folder, device="cpu", dtype="float32", quantization="int8", gpus=2)
    try:
        got = run(model)
    finally:
        model.close()
    assert ((got - expected).norm() / expected.norm()).item() < 0.05


def test_smollm2_over_three_processes(smollm2_dir, smollm2):
    """9 query heads and 3 kv heads: one kv head (and its 3 queries) per rank."""
    expected, expected_tokens = run(smollm2), greedy(smollm2, 32)
    model = ChatModel.load(smollm2_dir, device="cpu", dtype="float32", gpus=3)
    try:
        got, tokens = run(model), greedy(model, 32)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        text = "".join(model.session(ctx=512).reply(messages, GREEDY, max_new_tokens=16))
    finally:
        model.close()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert tokens == expected_tokens
    reference = "".join(smollm2.session(ctx=512).reply(messages, GREEDY, max_new_tokens=16))
    assert text == reference and "Paris" in text


@pytest.mark.parametrize(
    ("heads", "kv_heads", "width", "world", "message"),
    [
        (9, 3, 1536, 2, "9 attention heads do not split over 2 GPUs"),
        (8, 2, 340, 8, "MLP width 340 does not split over 8 GPUs"),
        (12, 3, 384, 4, "3 kv heads do not split over 4 GPUs"),
        (8, 2, 352, 0, "--gpus must be 1 or more"),
    ],
)
def test_a_split_that_does_not_divide_is_one_clear_error(
    tiny_model_factory, heads, kv_heads, width, world, message
):
    folder, _ = tiny_model_factory()
    config = ChatModel.load(folder, device="cpu").config
    from dataclasses import replace

    shaped = replace(config, n_heads=heads, n_kv_heads=kv_heads, intermediate_size=width)
    with pytest.raises(EngineError, match=message):
        check_world(shaped, world)


def test_each_rank_keeps_the_kv_heads_its_queries_read(tiny_model_factory):
    folder, _ = tiny_model_factory()
    config = ChatModel.load(folder, device="cpu").config  # 8 heads over 2 kv heads
    from dataclasses import replace

    for heads, kv_heads, world in [(8, 2, 2), (8, 2, 4), (8, 1, 4), (64, 8, 8), (32, 8, 16)]:
        shaped = replace(config, n_heads=heads, n_kv_heads=kv_heads)
        for rank in range(world):
            shard = Shard(shaped, rank, world)
            first_query = rank * shard.heads
            queries = range(first_query, first_query + shard.heads)
            read = {query // shaped.n_groups for query in queries}
            kept = set(range(shard.first_kv_head, shard.first_kv_head + shard.kv_heads))
            assert read == kept


def test_a_follower_that_cannot_load_its_part_says_so_in_one_line(tmp_path):
    """Its message is the one rank 0's error points to ("its message is above")."""
    import json
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    (tmp_path / "config.json").write_text("{not json")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    launch = dict(
        folder=str(tmp_path), weights_folder=str(tmp_path), device="cpu", dtype="float32",
        quantization=None, world=2, shape=None, rank=1, port=store.port,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "llamachat.engine.parallel.worker", json.dumps(launch)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "LLAMACHAT_PARENT_PID": str(os.getpid())},
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamachat: tensor-parallel rank 1:"), lines
    assert "config.json" in lines[0]
