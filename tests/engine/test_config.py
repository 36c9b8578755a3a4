"""Reading config.json: shapes, rope settings, and clear refusals."""

from __future__ import annotations

import json

import pytest

from llamachat.engine import ModelConfig, ModelLoadError, UnsupportedModelError
from tests.tiny import tiny_config


def llama(**overrides):
    return {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", **tiny_config(**overrides)}


def test_head_dim_and_groups_are_derived():
    config = ModelConfig.from_dict(llama(num_attention_heads=8, num_key_value_heads=2))
    assert config.head_dim == 16 and config.n_groups == 4


def test_llama2_70b_shape_stores_an_eighth_of_mha():
    config = ModelConfig.from_dict(
        llama(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80)
    )
    assert config.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2  # 320 KiB per token in bf16


def test_llama3_8b_parameter_count():
    config = ModelConfig.from_dict(
        llama(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
    )
    assert config.parameter_count() == 8_030_261_248
    assert config.kv_bytes_per_token(2) == 128 * 1024


def test_transformers5_rope_parameters_and_legacy_rope_scaling_read_alike():
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    legacy = ModelConfig.from_dict(
        llama(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
    )
    current = llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    del current["rope_theta"]
    modern = ModelConfig.from_dict(current)
    assert legacy == modern
    assert modern.rope_theta == 500000.0 and modern.rope_scaling.kind == "llama3"


def test_older_type_key_for_linear_scaling():
    config = ModelConfig.from_dict(llama(rope_scaling={"type": "linear", "factor": 2.0}))
    assert config.rope_scaling.kind == "linear" and config.rope_scaling.factor == 2.0


def test_unknown_rope_scaling_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict(llama(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_other_architectures_are_refused_by_name():
    raw = {**llama(), "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_dict(raw)


def test_architecture_from_model_type_when_the_list_is_absent():
    raw = llama()
    del raw["architectures"]
    raw["model_type"] = "mistral"
    assert ModelConfig.from_dict(raw).architecture == "MistralForCausalLM"


def test_mistral_sliding_window_caps_the_context():
    raw = {
        **llama(max_position_embeddings=32768),
        "architectures": ["MistralForCausalLM"],
        "sliding_window": 4096,
    }
    assert ModelConfig.from_dict(raw).max_position_embeddings == 4096


def test_non_silu_activation_is_refused():
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_dict({**llama(), "hidden_act": "gelu"})


def test_missing_entry_names_the_key():
    raw = llama()
    del raw["hidden_size"]
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_dict(raw)


def test_heads_must_divide_into_kv_heads():
    with pytest.raises(ModelLoadError, match="kv heads"):
        ModelConfig.from_dict(llama(num_attention_heads=8, num_key_value_heads=3))


def test_unreadable_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        ModelConfig.from_file(path)
    with pytest.raises(ModelLoadError, match="missing"):
        ModelConfig.from_file(tmp_path / "absent.json")


def test_parameter_count_matches_the_real_model(tiny_model_factory):
    _, reference = tiny_model_factory(tie_word_embeddings=True)
    config = ModelConfig.from_dict(json.loads(reference.config.to_json_string()))
    assert config.parameter_count() == sum(p.numel() for p in reference.parameters())
