"""Where a created model's weights come from when it loads: its own files, or (created with
--no-merge) its base's, with its adapters applied as they are read."""

from __future__ import annotations

from pathlib import Path

from ..engine.loading import AdjustWeight
from ..models.errors import StoreError
from ..models.store import InstalledModel, ModelStore
from .adapter import LoraAdapter
from .build import ADAPTERS
from .merge import adjust_on_loading


def weights_of(store: ModelStore, model: InstalledModel) -> tuple[Path, AdjustWeight | None]:
    """The folder to read `model`'s weights from, and what to apply to them. Raises StoreError
    when its base is gone or is no longer the one it was made from."""
    lineage = model.manifest.lineage
    if lineage is None or lineage.merged:
        return model.path, None
    try:
        base = store.get(lineage.base)
    except StoreError:
        raise StoreError(
            f"{model.name} applies its adapters to {lineage.base}, which is not installed:"
            f" pull {lineage.base_source} as {lineage.base}, or create {model.name} again"
        ) from None
    if (base.manifest.source, base.manifest.revision) != (
        lineage.base_source,
        lineage.base_revision,
    ):
        raise StoreError(
            f"{model.name} was made from another {lineage.base} ({lineage.base_source}"
            f" {lineage.base_revision or ''}): create {model.name} again"
        )
    base.check_sizes()
    kept = [model.path / ADAPTERS / str(n) for n in range(len(lineage.adapters))]
    return base.path, adjust_on_loading([LoraAdapter.read(folder) for folder in kept])
