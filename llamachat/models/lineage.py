"""Where a created model came from (`llamachat create`): its base and each adapter merged into
it, recorded in its manifest, so that `show` can say it and the files can be checked again."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AdapterRecord:
    path: str  # the folder it was read from
    sha256: str  # of its adapter_model.safetensors
    rank: int
    alpha: float
    rslora: bool
    scaling: float  # alpha / rank, or alpha / √rank with rsLoRA (its modules' default)


@dataclass(frozen=True)
class Lineage:
    base: str  # the installed model it was made from, when it was made
    base_source: str
    base_revision: str | None
    adapters: tuple[AdapterRecord, ...]
    merged: bool  # the adapters are in the weights (else applied on loading)

    @classmethod
    def from_json(cls, data: object) -> Lineage:
        """Raises ManifestError for a lineage that is not one."""
        if not isinstance(data, dict):
            raise ManifestError("manifest.json's lineage is not a JSON object")
        base, source = data.get("base"), data.get("base_source")
        revision, merged = data.get("base_revision"), data.get("merged")
        adapters = data.get("adapters")
        if not isinstance(base, str) or not isinstance(source, str):
            raise ManifestError("manifest.json's lineage has no base")
        if not (revision is None or isinstance(revision, str)) or not isinstance(merged, bool):
            raise ManifestError("manifest.json's lineage is malformed")
        if not isinstance(adapters, list):
            raise ManifestError("manifest.json's lineage has no list of adapters")
        return cls(base, source, revision, tuple(_adapter(a) for a in adapters), merged)


def _adapter(data: object) -> AdapterRecord:
    if not isinstance(data, dict):
        raise ManifestError("manifest.json's lineage lists an adapter that is not an object")
    path, sha256, rank = data.get("path"), data.get("sha256"), data.get("rank")
    alpha, rslora, scaling = data.get("alpha"), data.get("rslora"), data.get("scaling")
    if not isinstance(path, str) or not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ManifestError("manifest.json's lineage lists an adapter without path or sha256")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ManifestError("manifest.json's lineage lists an adapter without a rank")
    if not (_number(alpha) and _number(scaling) and isinstance(rslora, bool)):
        raise ManifestError("manifest.json's lineage lists an adapter without its scaling")
    return AdapterRecord(path, sha256, rank, float(alpha), rslora, float(scaling))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
