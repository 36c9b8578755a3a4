"""The model's shape, read from a Hugging Face `config.json`.

Only the LLaMA layout is accepted (LlamaForCausalLM, and Mistral configs without a sliding
window in effect); anything else fails with an error that names what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: `linear` (position interpolation) or `llama3` (Llama-3.1/3.2)."""

    kind: Literal["linear", "llama3"]
    factor: float
    # llama3 only: the band between these two wavelengths is interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def n_groups(self) -> int:
        """Query heads that share one kv head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of KV cache one token takes: K and V, every layer, kv heads only."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def parameter_count(self) -> int:
        d, ff = self.hidden_size, self.intermediate_size
        attention = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attention += self.q_size + 2 * self.kv_size + d
        mlp = 3 * d * ff + (2 * ff + d if self.mlp_bias else 0)
        per_layer = attention + mlp + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + embeddings + d

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"{path} is missing: not a Hugging Face model folder") from None
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot read {path}: {error}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(raw)
        try:
            hidden_size = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            n_kv_heads = int(raw.get("num_key_value_heads") or n_heads)
            head_dim = int(raw.get("head_dim") or hidden_size // n_heads)
            config = cls(
                architecture=architecture,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(raw["intermediate_size"]),
                n_layers=int(raw["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=n_kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(raw),
                rope_scaling=_rope_scaling(raw),
                max_position_embeddings=_context_length(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                bos_token_id=_optional_int(raw.get("bos_token_id")),
                eos_token_ids=_id_tuple(raw.get("eos_token_id")),
            )
        except KeyError as missing:
            raise ModelLoadError(f"config.json has no {missing} entry") from None
        except (TypeError, ValueError) as error:
            raise ModelLoadError(f"config.json has a malformed entry: {error}") from None
        _check_dimensions(config, raw)
        return config


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    if not names and raw.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[raw["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or f"model_type {raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {found}: llamachat runs "
        f"{' and '.join(SUPPORTED_ARCHITECTURES)} models"
    )


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers ≥ 5 writes `rope_parameters`; older configs (and the Hub) use
    # `rope_theta` beside an optional `rope_scaling`.
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict):
        return parameters
    return raw.get("rope_scaling") or {}


def _rope_theta(raw: dict[str, Any]) -> float:
    return float(_rope_parameters(raw).get("rope_theta") or raw.get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    parameters = _rope_parameters(raw)
    kind = parameters.get("rope_type") or parameters.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(parameters["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(parameters["factor"]),
            low_freq_factor=float(parameters["low_freq_factor"]),
            high_freq_factor=float(parameters["high_freq_factor"]),
            original_max_position_embeddings=int(parameters["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(
        f"unsupported rope scaling {kind!r}: llamachat implements 'linear' and 'llama3'"
    )


def _context_length(raw: dict[str, Any]) -> int:
    length = int(raw.get("max_position_embeddings", 2048))
    # Attention is exactly full attention while the window covers the whole context, so a
    # Mistral sliding window is honoured by never letting the context grow past it.
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window", True) and window:
        length = min(length, int(window))
    return length


def _check_dimensions(config: ModelConfig, raw: dict[str, Any]) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(
            f"unsupported activation {act!r}: the LLaMA MLP is SwiGLU (silu)"
        )
    if config.n_heads % config.n_kv_heads:
        raise ModelLoadError(
            f"config.json: {config.n_heads} attention heads do not divide into "
            f"{config.n_kv_heads} kv heads"
        )
    if config.head_dim % 2:
        raise ModelLoadError(
            f"config.json: head_dim {config.head_dim} must be even for rotary embedding"
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
