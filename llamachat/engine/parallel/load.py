"""Loading a model over several ranks: each reads the checkpoint and keeps its part."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..decode import DecodeStep, choose_logits, fused_kernels_fit
from ..decode.cpu import CpuDecodeStep
from ..errors import DeviceError
from ..loading import DTYPE_BY_NAME, load_transformer
from ..model import Transformer
from ..random_weights import random_transformer, shape_config
from ..shard_layers import parallelize
from ..shards import Shard, check_world
from .group import Launch, Leader, await_followers, join, master_store, start_followers


def load_part(launch: Launch, rank: int) -> Transformer:
    """Rank `rank`'s part of the model, wired to the other ranks (shard_layers.parallelize)."""
    config = _config(launch)
    shard = Shard(config, rank, launch.world)
    device, dtype = launch.device_of(rank), DTYPE_BY_NAME[launch.dtype]
    if device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // launch.world))
    if launch.weights_folder is None:  # a benchmark's random weights, each rank its own part
        transformer = random_transformer(
            shard.local_config(), device, dtype, launch.quantization, seed=rank
        )
    else:
        transformer = load_transformer(
            Path(launch.weights_folder), config, device, dtype, launch.quantization, shard=shard
        )
    logits = choose_logits(transformer)
    parallelize(transformer, shard, logits)
    transformer.decode_step = _decode_step(transformer)
    return transformer


def _decode_step(transformer: Transformer) -> DecodeStep | None:
    """The fused CUDA step and the PyTorch CPU step reach the parts' collectives (they call the
    row-parallel projections, embedding and head); the C step would bypass them."""
    if fused_kernels_fit(transformer):
        from ..decode.cuda import FusedDecodeStep

        return FusedDecodeStep(transformer)
    if transformer.tok_embeddings.weight.device.type == "cpu":
        return CpuDecodeStep(transformer)
    return None


def check_gpus(device: torch.device, gpus: int) -> None:
    """DeviceError unless this machine has `gpus` GPUs for a model split over GPUs 0…N-1."""
    if device.type != "cuda":
        return
    if device.index not in (None, 0):
        raise DeviceError("--gpus N runs on GPUs 0 to N-1: leave out --device's number")
    if gpus > torch.cuda.device_count():
        raise DeviceError(
            f"--gpus {gpus} asks for more GPUs than this machine has ({torch.cuda.device_count()})"
        )


def _config(launch: Launch) -> ModelConfig:
    if launch.shape is not None:
        return shape_config(launch.shape)
    assert launch.folder is not None
    return ModelConfig.from_file(Path(launch.folder) / "config.json")


def load_parallel(launch: Launch) -> tuple[Transformer, Leader]:
    """Rank 0's part, the other ranks started as processes and loaded: (part, its Leader)."""
    check_world(_config(launch), launch.world)
    store = master_store(launch.world)
    processes = start_followers(launch, store)
    try:
        transformer = load_part(launch, 0)
        await_followers(store, processes)
        control = join(launch, 0, store)
    except BaseException:
        for process in processes:
            process.kill()
        raise
    leader = Leader(processes, control)
    transformer.leader = leader
    return transformer, leader
