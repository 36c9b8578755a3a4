"""Installed models: one folder each under `<data>/models/`, made visible by a single rename.

    models/
      smollm2/                 an installed model: config, tokenizer, safetensors, manifest.json
      .staging/NAME.PID/       an install in progress (removed, or left behind if killed)
      .staging/NAME.lock       held while NAME is being installed
      .trash/NAME.PID/         a replaced or removed model on its way out

A pull killed at any point leaves at most a stale staging folder, which the next pull of any
model clears; `list` only ever sees folders that hold a manifest. A manifest that cannot be read
(damaged by hand, by a disk, by a newer llamachat's mistake) makes a BrokenModel: listed as such,
removable, and replaced by the next pull of its name.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..private import private_dir
from ..processes import pid_alive
from .catalog import CATALOG
from .errors import (
    BrokenModelError,
    BusyError,
    DamagedModelError,
    ManifestError,
    ModelNotFoundError,
    StoreError,
)
from .fs import clear_dead, owner_pid
from .integrity import FileProblem, size_problems
from .manifest import MANIFEST_NAME, Manifest

_VALID_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class InstalledModel:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.path.name  # the folder names the model, whatever its manifest says

    @property
    def quantized_cache(self) -> Path:
        """Where the engine keeps this model's weights quantised for the next load (not part
        of the install: it goes with the model, and a missing one is made again)."""
        return self.path / "quantized"

    def size_problems(self) -> list[FileProblem]:
        """Files missing or of another size than recorded (one stat each: cheap)."""
        return size_problems(self.path, self.manifest.files)

    def check_sizes(self) -> None:
        """Raise DamagedModelError, naming the files, before a damaged model is loaded."""
        problems = self.size_problems()
        if problems:
            raise self.damaged(problems)

    def damaged(self, problems: list[FileProblem], verified: bool = False) -> DamagedModelError:
        """The error for these problems; `verified`: found by reading every byte already."""
        hint = repair_hint(self.name, self.manifest, remove_first=verified)
        if not verified:
            hint = f"`llamachat verify {self.name}` checks every file, {hint}"
        return DamagedModelError(self.name, [str(p) for p in problems], hint)


@dataclass(frozen=True)
class BrokenModel:
    """A model folder whose manifest cannot be read: it can only be removed or pulled again."""

    path: Path
    problem: str  # what is wrong with the manifest

    @property
    def name(self) -> str:
        return self.path.name

    def error(self) -> BrokenModelError:
        return BrokenModelError(self.name, self.problem, repair_hint(self.name))


def repair_hint(name: str, manifest: Manifest | None = None, remove_first: bool = False) -> str:
    """What to run for a model that cannot be used as it is. `remove_first`: a pull alone would
    find it up to date (its files have the recorded sizes)."""
    spec = _pull_spec(name, manifest)
    command = f"llamachat pull {spec}" + ("" if spec == name else f" --as {name}")
    if remove_first:
        return f"`llamachat rm {name} --yes && {command}` reinstalls it"
    return f"`{command}` reinstalls it, `llamachat rm {name}` removes it"


def _pull_spec(name: str, manifest: Manifest | None) -> str:
    """What to pull to get the model back: its catalog name, its Hub commit or its path."""
    if manifest is None:
        return name if name in CATALOG else "SOURCE"
    aliases = [alias for alias, entry in CATALOG.items() if entry.source == manifest.source]
    if aliases:
        return name if name in aliases else aliases[0]
    if manifest.source.startswith("hf:"):
        return manifest.source + (f"@{manifest.revision}" if manifest.revision else "")
    if manifest.source.startswith("pypi:"):
        return "SOURCE"
    return shlex.quote(manifest.source)


def check_name(name: str) -> str:
    if not _VALID_NAME.fullmatch(name):
        raise StoreError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


class ModelStore:
    def __init__(self, root: Path):
        self.root = root
        self._staging = root / ".staging"
        self._trash = root / ".trash"

    def scan(self) -> list[InstalledModel | BrokenModel]:
        """Every model folder, by name: those whose manifest reads, and the broken ones."""
        if not self.root.is_dir():
            return []
        return [
            _open(folder)
            for folder in sorted(self.root.iterdir())
            if _VALID_NAME.fullmatch(folder.name) and (folder / MANIFEST_NAME).is_file()
        ]

    def installed(self) -> list[InstalledModel]:
        """The models that can be used (a broken one is in `scan` only)."""
        return [model for model in self.scan() if isinstance(model, InstalledModel)]

    def entry(self, name: str) -> InstalledModel | BrokenModel:
        """The model folder `name`, broken or not."""
        folder = self.root / name
        if _VALID_NAME.fullmatch(name) and (folder / MANIFEST_NAME).is_file():
            return _open(folder)
        raise self._not_found(name)

    def _not_found(self, name: str) -> ModelNotFoundError:
        """A catalog name is offered for pulling; otherwise the installed names close to
        `name`, else the catalog's."""
        if name in CATALOG:
            return ModelNotFoundError(name, [name], from_catalog=True)
        names = [model.name for model in self.scan()]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        if close:
            return ModelNotFoundError(name, close)
        pullable = difflib.get_close_matches(name, list(CATALOG), n=3, cutoff=0.6)
        return ModelNotFoundError(name, pullable, from_catalog=bool(pullable))

    def get(self, name: str) -> InstalledModel:
        """The installed model `name`; BrokenModelError says how to repair a broken one."""
        model = self.entry(name)
        if isinstance(model, BrokenModel):
            raise model.error()
        return model

    def choose(self, requested: str | None, default: str | None = None) -> InstalledModel:
        """The model asked for, else the configured default, else the latest installed."""
        name = requested or default
        if name:
            return self.get(name)
        latest = self.latest()
        if latest is None:
            raise StoreError(
                "no model is installed: run `llamachat pull smollm2` to get the default one"
            )
        return latest

    def latest(self) -> InstalledModel | None:
        """The most recently installed model."""
        models = self.installed()
        return max(models, key=lambda m: m.manifest.installed_at) if models else None

    def needed_by(self, name: str) -> list[str]:
        """The created models that apply their adapters to `name` on loading (--no-merge)."""
        return sorted(
            model.name
            for model in self.installed()
            if model.manifest.lineage is not None
            and not model.manifest.lineage.merged
            and model.manifest.lineage.base == name
        )

    def check_removable(self, name: str) -> None:
        """Raises StoreError for a base that created models still load their weights from."""
        needing = self.needed_by(name)
        if needing:
            many = len(needing) > 1
            raise StoreError(
                f"{', '.join(needing)} {'load' if many else 'loads'} its weights from {name}:"
                f" remove {'them' if many else 'it'} first, or pass --force (then"
                f" {'they' if many else 'it'} cannot load)"
            )

    def remove(self, name: str, force: bool = False) -> None:
        """Unless `force`, refuses a base that created models load from (check_removable)."""
        model = self.entry(name)
        if not force:
            self.check_removable(name)
        self._trash.mkdir(parents=True, exist_ok=True)
        doomed = self._trash / f"{name}.{os.getpid()}"
        os.replace(model.path, doomed)  # gone from `list` in one step
        # The manifest goes first, so a removal killed half-way is never mistaken for a
        # replacement to roll back (see _clear_leftovers).
        (doomed / MANIFEST_NAME).unlink()
        shutil.rmtree(doomed, ignore_errors=True)

    def set_quantization(self, name: str, quantization: str | None) -> InstalledModel:
        """Record the weight format an installed model loads in by default (None: auto). Only
        its manifest changes, in one rename, while no install of the same name runs."""
        self._staging.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self._staging / f"{check_name(name)}.lock", name):
            model = self.get(name)
            clear_dead(self._staging, "*.manifest.*")
            manifest = replace(model.manifest, quantization=quantization)
            manifest.rewrite(model.path, self._staging)
            return InstalledModel(model.path, manifest)

    @contextlib.contextmanager
    def install(self, name: str) -> Iterator[Staging]:
        """Stage a model; it appears when the block ends normally, and never otherwise."""
        check_name(name)
        private_dir(self.root)
        self._staging.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self._staging / f"{name}.lock", name):
            self._clear_leftovers()
            folder = self._staging / f"{name}.{os.getpid()}"
            staging = Staging(folder, self.root / name, self._trash)
            shutil.rmtree(staging.path, ignore_errors=True)
            staging.path.mkdir()
            try:
                yield staging
                staging.commit()
            finally:
                shutil.rmtree(staging.path, ignore_errors=True)

    def _clear_leftovers(self) -> None:
        """Remove what killed processes left: their staging folders, and finished trash. A model
        whose replacement was killed half-way is put back."""
        for folder in list(self._staging.glob("*.*")) + list(self._trash.glob("*.*")):
            pid = owner_pid(folder)
            if not folder.is_dir() or pid is None or pid_alive(pid):
                continue
            target = self.root / folder.name.rpartition(".")[0]
            replaced = folder.parent == self._trash and (folder / MANIFEST_NAME).is_file()
            if replaced and not target.exists():
                os.replace(folder, target)
            else:
                shutil.rmtree(folder, ignore_errors=True)


class Staging:
    def __init__(self, path: Path, target: Path, trash: Path):
        self.path = path
        self._target = target
        self._trash = trash
        self.manifest: Manifest | None = None

    def commit(self) -> None:
        if self.manifest is None:
            raise StoreError("internal error: staged model has no manifest")
        self.manifest.write(self.path)
        if self._target.exists():
            self._trash.mkdir(parents=True, exist_ok=True)
            old = self._trash / f"{self._target.name}.{os.getpid()}"
            os.replace(self._target, old)
            os.replace(self.path, self._target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self._target)


def _open(folder: Path) -> InstalledModel | BrokenModel:
    try:
        return InstalledModel(folder, Manifest.read(folder))
    except ManifestError as error:
        return BrokenModel(folder, str(error))


@contextlib.contextmanager
def _exclusive_lock(path: Path, name: str) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(
                f"another llamachat process is installing {name!r}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
