"""`llamachat create`: a new installed model from an installed base, LoRA adapters merged into
its weights, and its own reply defaults (a system prompt, sampling parameters, a chat format).

Everything is written into the store's staging folder and appears in one rename, with a
manifest recording the lineage: a create that fails or is killed leaves nothing in `list`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..engine.chat_format import BUILTIN_FORMATS, MODEL_FORMAT
from ..engine.errors import EngineError
from ..models.errors import StoreError
from ..models.fs import link_or_copy
from ..models.inspect import inspect_folder
from ..models.lineage import AdapterRecord, Lineage
from ..models.manifest import MANIFEST_NAME, Manifest, file_records
from ..models.reply_defaults import CREATED_DEFAULTS
from ..models.store import InstalledModel, ModelStore, check_name
from .adapter import TOKENIZER_FILES, LoraAdapter
from .chatfile import ChatfileError, Recipe
from .merge import merge_checkpoint

_TOKENIZER_FILES = set(TOKENIZER_FILES)


def create_model(
    store: ModelStore,
    name: str,
    recipe: Recipe,
    on_tensor: Callable[[int], None] | None = None,
) -> InstalledModel:
    """Make `name` from `recipe`. Raises StoreError (ChatfileError, AdapterError...) with a
    one-line message; nothing is installed then."""
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
    adapters = [LoraAdapter.read(folder.resolve()) for folder in recipe.adapters]
    try:
        config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StoreError(f"{base.name}'s config.json cannot be read ({error})") from None
    linked: dict[str, str] = {}  # files shared with the base: their digests are the base's
    digests = {record.path: record.sha256 for record in base.manifest.files}
    with store.install(name) as staging:
        merged = None  # without adapters the weights are the base's own files, linked
        if adapters:
            merged = merge_checkpoint(
                base.path, config, adapters, staging.path, base.name, on_tensor
            )
        written = {path.name for path in staging.path.iterdir()}
        takes_tokenizer = next((a for a in reversed(adapters) if a.tokenizer_files), None)
        for source in sorted(base.path.iterdir()):
            skip = source.name in written or source.name in (MANIFEST_NAME, CREATED_DEFAULTS)
            if takes_tokenizer and source.name in _TOKENIZER_FILES:
                skip = True  # the adapter's tokenizer replaces the base's
            if source.is_file() and not skip and source.name != "config.json":
                link_or_copy(source, staging.path / source.name)
                if source.name in digests:
                    linked[source.name] = digests[source.name]
        if takes_tokenizer is not None:
            for file_name in takes_tokenizer.tokenizer_files:
                link_or_copy(takes_tokenizer.folder / file_name, staging.path / file_name)
        if merged is not None and merged.vocab_size is not None:
            config["vocab_size"] = merged.vocab_size
        if merged is not None and merged.untied:
            config["tie_word_embeddings"] = False
        (staging.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        defaults = {
            "system": recipe.system,
            "chat_format": recipe.chat_format,
            "parameters": recipe.parameters,
        }
        (staging.path / CREATED_DEFAULTS).write_text(json.dumps(defaults, indent=2) + "\n")
        try:
            facts = inspect_folder(staging.path)
        except EngineError as error:
            raise StoreError(f"the created model cannot be read: {error}") from None
        lineage = Lineage(
            base=base.name,
            base_source=base.manifest.source,
            base_revision=base.manifest.revision,
            adapters=tuple(_record(adapter) for adapter in adapters),
            merged=True,
        )
        count = len(adapters)
        staging.manifest = Manifest(
            name=name,
            source=f"{base.name} + {count} adapter{'s' if count != 1 else ''}",
            revision=None,
            files=file_records(staging.path, linked),
            chat_format=recipe.chat_format or base.manifest.chat_format,
            parameters=facts.config.parameter_count(),
            context_length=facts.config.max_position_embeddings,
            weights=facts.weights_dtype + (" (LoRA merged)" if adapters else ""),
            quantization=base.manifest.quantization,
            lineage=lineage,
        )
    return store.get(name)


def _record(adapter: LoraAdapter) -> AdapterRecord:
    scaling = adapter.alpha / (adapter.rank**0.5 if adapter.rslora else adapter.rank)
    return AdapterRecord(
        str(adapter.folder), adapter.sha256, adapter.rank, adapter.alpha, adapter.rslora, scaling
    )
