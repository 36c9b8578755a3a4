"""What the engine imports, and how it refuses what it cannot do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from llamachat.engine import ChatModel, DeviceError, ModelLoadError, UnsupportedModelError
from llamachat.engine.loading import resolve_device, resolve_dtype


def test_engine_import_loads_no_ui_library():
    code = (
        "import sys, llamachat.engine\n"
        "ui = [m for m in ('textual', 'typer', 'rich') if m in sys.modules]\n"
        "print(','.join(ui))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_model_store_imports_no_torch():
    code = "import sys, llamachat.models.gguf\nprint('torch' in sys.modules)\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_auto_device_and_dtype_on_this_machine():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    expected = torch.float32 if device.type == "cpu" else torch.bfloat16
    assert resolve_dtype(None, device) == expected


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "gpu0"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(DeviceError):
        resolve_device(name)


def test_fp16_on_cpu_and_unknown_dtypes_are_refused():
    with pytest.raises(DeviceError, match="bfloat16"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def copy_model(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory()
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def test_missing_weights_are_named(tiny_model_factory, tmp_path):
    folder = copy_model(tiny_model_factory, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        ChatModel.load(folder, device="cpu")


def test_pickle_weights_are_refused(tiny_model_factory, tmp_path):
    folder = copy_model(tiny_model_factory, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        ChatModel.load(folder, device="cpu")


def test_weights_that_do_not_match_the_config_are_named(tiny_model_factory, tmp_path):
    folder = copy_model(tiny_model_factory, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="missing layers.2"):
        ChatModel.load(folder, device="cpu")
    config["num_hidden_layers"], config["intermediate_size"] = 2, 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="shape"):
        ChatModel.load(folder, device="cpu")


def test_unsupported_architecture_names_it(tiny_model_factory, tmp_path):
    folder = copy_model(tiny_model_factory, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        ChatModel.load(folder, device="cpu")


def test_sharded_checkpoint_loads_like_a_single_file(tiny_model_factory, tmp_path):
    folder, reference = tiny_model_factory()
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).exists():
            shutil.copy(folder / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    one, many = ChatModel.load(folder, device="cpu"), ChatModel.load(sharded, device="cpu")
    sharded_state = many.transformer.state_dict()
    for name, tensor in one.transformer.state_dict().items():
        assert torch.equal(tensor, sharded_state[name]), name


def test_session_context_is_bounded_by_the_model(tiny_model):
    from llamachat.engine import EngineError

    with pytest.raises(EngineError, match="context length"):
        tiny_model.session(ctx=tiny_model.context_length + 1)
    assert tiny_model.session().ctx == min(tiny_model.context_length, 8192)
