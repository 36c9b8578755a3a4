"""Models of real shapes with random weights, made right on the device: what the benchmarks
measure (speed does not depend on the weights' values), one device's or one rank's part."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import Transformer
from .quantize import head_quantization, quantizable, quantize_linear

SHAPES: dict[str, dict] = {
    "8b": dict(  # Llama-3-8B / 3.1-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    "7b": dict(  # Llama-2-7B
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    ),
    "70b": dict(  # Llama-2-70B
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
    ),
    "1b": dict(  # Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "toy": dict(  # no real model's: a few hundred kB, for tests of `serve --shape` on a CPU
        vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    ),
}  # fmt: skip


def shape_config(shape: str) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **SHAPES[shape]})


def random_transformer(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
    seed: int = 0,
) -> Transformer:
    """The transformer of `config` with random weights, as random_model makes them."""
    transformer = Transformer(config, device="meta")
    generator = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, parameter in list(transformer.named_parameters()):
        module_name, _, kind = name.rpartition(".")
        if "norm" in name:
            state[name] = torch.ones(parameter.shape, device=device, dtype=dtype)
            continue
        value = torch.empty(parameter.shape, device=device, dtype=dtype)
        value.normal_(0.0, 0.02, generator=generator)
        if quantization and kind == "weight" and quantizable(module_name):
            mode = head_quantization(quantization) if module_name == "output" else quantization
            transformer.set_submodule(module_name, quantize_linear(value, None, mode))
        else:
            state[name] = value
    transformer.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings and not quantization:
        transformer.output.weight = transformer.tok_embeddings.weight
    return transformer.eval().requires_grad_(False)
