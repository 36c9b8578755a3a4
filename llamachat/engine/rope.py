"""Rotary position embedding (RoFormer), in the half-split layout Hugging Face checkpoints use.

Frequencies are computed in float32, as the reference does, and cast to the activation dtype only
when applied, so bf16 models see the same angles as fp32 ones.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeScaling


def inverse_frequencies(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The head_dim/2 rotation speeds θ_i = base^(-2i/d), after any frequency scaling."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (config.rope_theta ** (exponents / config.head_dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama-3.1's scheme: long wavelengths are slowed by `factor`, short ones kept, and the band
    between them blended, so the model keeps local detail while reaching further."""
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * slowed / scaling.factor + smooth * slowed
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, slowed)


def rope_tables(
    config: ModelConfig, max_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, max_len), each (max_len, head_dim), float32."""
    inv_freq = inverse_frequencies(config, device)
    positions = torch.arange(max_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_len, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (max_len, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, hd) by the angles in cos/sin (T, 1, hd), already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)
