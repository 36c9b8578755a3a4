"""`llamachat create`: a new installed model from an installed base, LoRA adapters merged into
its weights, and its own reply defaults (a system prompt, sampling parameters, a chat format).

Everything is written into the store's staging folder and appears in one rename, with a
manifest recording the lineage: a create that fails or is killed leaves nothing in `list`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..engine.chat_format import BUILTIN_FORMATS, MODEL_FORMAT
from ..engine.errors import EngineError
from ..models.errors import StoreError
from ..models.fs import link_or_copy
from ..models.inspect import inspect_folder
from ..models.lineage import AdapterRecord, Lineage
from ..models.manifest import MANIFEST_NAME, Manifest, file_records
from ..models.reply_defaults import CREATED_DEFAULTS
from ..models.store import InstalledModel, ModelStore, check_name
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TOKENIZER_FILES, AdapterError, LoraAdapter
from .chatfile import ChatfileError, Recipe
from .merge import INDEX, Plan, merge_checkpoint

ADAPTERS = "adapters"  # a model's adapters applied on loading: adapters/0, adapters/1...

_TOKENIZER_FILES = set(TOKENIZER_FILES)


def create_model(
    store: ModelStore,
    name: str,
    recipe: Recipe,
    on_tensor: Callable[[int], None] | None = None,
    merge: bool = True,
) -> InstalledModel:
    """Make `name` from `recipe`. Raises StoreError (ChatfileError, AdapterError...) with a
    one-line message; nothing is installed then. Without `merge` the adapters are kept, copied,
    in the model's adapters/ and applied each time it loads, over its base's weights, which are
    not copied (create/loading.py reads it so)."""
    check_name(name)
    if recipe.base is None:
        raise ChatfileError("create needs a base model: FROM in the Chatfile, or --from")
    formats = (MODEL_FORMAT, *BUILTIN_FORMATS)
    if recipe.chat_format is not None and recipe.chat_format not in formats:
        known = ", ".join(formats)
        raise ChatfileError(f"unknown chat format {recipe.chat_format!r} (known: {known})")
    base = store.get(recipe.base)
    if name == base.name:
        raise ChatfileError(f"{name} cannot be made from itself: choose another name")
    base.check_sizes()
    try:
        config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StoreError(f"{base.name}'s config.json cannot be read ({error})") from None
    with tempfile.TemporaryDirectory(prefix="llamachat-create-") as scratch:
        adapters = [
            _read_adapter(path.resolve(), config, Path(scratch) / str(number))
            for number, path in enumerate(recipe.adapters)
        ]
        return _create(store, name, recipe, base, config, adapters, on_tensor, merge)


def _read_adapter(path: Path, config: dict, scratch: Path) -> LoraAdapter:
    """A PEFT folder as it is; a llama.cpp GGUF adapter converted into `scratch` first."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_adapter import read_gguf_adapter

        scratch.mkdir()
        return read_gguf_adapter(path, config, scratch)
    return LoraAdapter.read(path)


def _create(
    store: ModelStore,
    name: str,
    recipe: Recipe,
    base: InstalledModel,
    config: dict,
    adapters: list[LoraAdapter],
    on_tensor: Callable[[int], None] | None,
    merge: bool,
) -> InstalledModel:
    plan = Plan.of(base.path, config, adapters, base.name) if adapters else None
    if plan is not None and plan.extra and not merge:
        raise AdapterError(
            f"an adapter gives {base.name} an lm_head of its own (the base ties it to the"
            " embeddings): create it merged, without --no-merge"
        )
    with store.install(name) as staging:
        if plan is not None and merge:
            merge_checkpoint(base.path, plan, adapters, staging.path, on_tensor)
        for number, adapter in enumerate(adapters if not merge else []):
            kept = staging.path / ADAPTERS / str(number)  # applied on loading: a copy of each
            kept.mkdir(parents=True)
            for file_name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(adapter.folder / file_name, kept / file_name)
        takes_tokenizer = next((a for a in reversed(adapters) if a.tokenizer_files), None)
        linked = _link_base_files(base, staging.path, bool(takes_tokenizer), merge)
        if takes_tokenizer is not None:  # copied: the user's folder may change later
            for file_name in takes_tokenizer.tokenizer_files:
                shutil.copyfile(takes_tokenizer.folder / file_name, staging.path / file_name)
        if plan is not None and plan.vocab_size is not None:
            config["vocab_size"] = plan.vocab_size
        if plan is not None and plan.extra:
            config["tie_word_embeddings"] = False
        (staging.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        defaults = {
            "system": recipe.system,
            "chat_format": recipe.chat_format,
            "parameters": recipe.parameters,
        }
        (staging.path / CREATED_DEFAULTS).write_text(json.dumps(defaults, indent=2) + "\n")
        weights_folder = None if merge else base.path
        try:
            facts = inspect_folder(staging.path, weights_folder=weights_folder)
        except EngineError as error:
            raise StoreError(f"the created model cannot be read: {error}") from None
        lineage = Lineage(
            base=base.name,
            base_source=base.manifest.source,
            base_revision=base.manifest.revision,
            adapters=tuple(_record(adapter) for adapter in adapters),
            merged=merge,
        )
        count = len(adapters)
        how = " (LoRA merged)" if merge else " (LoRA applied on loading)"
        staging.manifest = Manifest(
            name=name,
            source=f"{base.name} + {count} adapter{'s' if count != 1 else ''}",
            revision=None,
            files=file_records(staging.path, linked),
            chat_format=recipe.chat_format or base.manifest.chat_format,
            parameters=facts.config.parameter_count(),
            context_length=facts.config.max_position_embeddings,
            weights=facts.weights_dtype + (how if adapters else ""),
            quantization=base.manifest.quantization,
            lineage=lineage,
        )
    return store.get(name)


def _link_base_files(
    base: InstalledModel, folder: Path, own_tokenizer: bool, merged: bool
) -> dict[str, str]:
    """Link the base's files the created model shares into `folder` (not what is there
    already, its config or manifest; not its tokenizer when an adapter brings one; not its
    weights when the adapters apply on loading). Returns their sha256s, the base's records."""
    written = {path.name for path in folder.iterdir()}
    digests = {record.path: record.sha256 for record in base.manifest.files}
    linked = {}
    for source in sorted(base.path.iterdir()):
        own = source.name in (*written, MANIFEST_NAME, CREATED_DEFAULTS, "config.json")
        tokenizer = own_tokenizer and source.name in _TOKENIZER_FILES
        weights = not merged and (source.suffix == ".safetensors" or source.name == INDEX)
        if source.is_file() and not (own or tokenizer or weights):
            link_or_copy(source, folder / source.name)
            if source.name in digests:
                linked[source.name] = digests[source.name]
    return linked


def _record(adapter: LoraAdapter) -> AdapterRecord:
    scaling = adapter.alpha / (adapter.rank**0.5 if adapter.rslora else adapter.rank)
    return AdapterRecord(
        str(adapter.origin), adapter.sha256, adapter.rank, adapter.alpha, adapter.rslora, scaling
    )
