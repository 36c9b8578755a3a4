"""What an installed (or staged) model folder holds, read from its files without torch."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.chat_format import MODEL_FORMAT, builtin_for_vocabulary
from ..engine.config import ModelConfig
from .errors import StoreError

_SAFETENSORS_DTYPE_NAMES = {
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "F64": "float64",
}


@dataclass(frozen=True)
class ModelFacts:
    config: ModelConfig
    chat_format: str
    chat_template: str
    weights_dtype: str


def inspect_folder(
    folder: Path, chat_format: str | None = None, weights_folder: Path | None = None
) -> ModelFacts:
    """`weights_folder`: where the weights are, when not in `folder` (a created model whose
    adapters apply on loading, over its base's weights)."""
    config = ModelConfig.from_file(folder / "config.json")
    template = chat_template(folder)
    if chat_format is None:
        if template:
            chat_format = MODEL_FORMAT
        else:
            builtin = builtin_for_vocabulary(_vocabulary(folder))
            chat_format, template = builtin.name, builtin.template
    return ModelFacts(config, chat_format, template or "", weights_dtype(weights_folder or folder))


def chat_template(folder: Path) -> str | None:
    """The model's own chat template: chat_template.jinja, or tokenizer_config.json's entry."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # several named templates; the default one is the chat's
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template or None


def weights_dtype(folder: Path) -> str:
    """The dtype of the embedding matrix, as stored (safetensors headers are plain JSON)."""
    for path in sorted(folder.glob("*.safetensors")):
        header = _safetensors_header(path)
        entry = header.get("model.embed_tokens.weight")
        if entry:
            return _SAFETENSORS_DTYPE_NAMES.get(entry["dtype"], entry["dtype"].lower())
    raise StoreError(f"{folder} has no safetensors file holding model.embed_tokens.weight")


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            return json.loads(file.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise StoreError(f"{path.name} is not a readable safetensors file: {error}") from None


def _vocabulary(folder: Path) -> set[str]:
    tokenizer = _json(folder / "tokenizer.json")
    vocabulary = set(tokenizer.get("model", {}).get("vocab", {}) or ())
    vocabulary.update(token.get("content", "") for token in tokenizer.get("added_tokens", []))
    return vocabulary


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StoreError(f"cannot read {path.name}: {error}") from None
