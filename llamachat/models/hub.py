"""Downloads from the Hugging Face Hub, into the Hugging Face cache (HF_HOME).

huggingface_hub answers the questions (which commit a revision is, which files it holds and their
digests, where each file's bytes are and with which headers); the bytes themselves are fetched
here, because huggingface_hub discards a partial download when its process dies. Each file
grows in the cache as blobs/ETAG.incomplete: a pull that is killed, loses the network or runs
out of disk leaves it there, and the next pull asks only for the missing range. Complete files
are checked against the Hub's digest (sha256 for LFS files, the git blob id for the rest) and
then placed exactly as huggingface_hub would place them, so a model already in the cache is
never downloaded again, by llamachat or by anything else that uses the cache.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import IntegrityError, SourceError
from .fs import is_safe_relative_path
from .progress import Progress

# What a model needs, at the top level of the repo only: Meta's repos also carry the original
# consolidated .pth checkpoints under original/, and many repos .bin twins of the weights.
DEFAULT_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja")
REQUEST_TIMEOUT_S = 10.0
MAX_STALLED_ATTEMPTS = 4  # consecutive tries without a new byte before a download gives up
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")  # commits and git blob ids
_SHA256 = re.compile(r"[0-9a-f]{64}")  # LFS files


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # LFS files only

    @property
    def cache_name(self) -> str:
        """The file's name in the cache's blobs/ folder (its ETag)."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class Snapshot:
    repo: str
    commit: str
    folder: Path  # the cache's snapshot folder: one link per file
    files: tuple[HubFile, ...]
    sha256: dict[str, str]  # path → verified sha256, for the manifest


def resolve(repo: str, revision: str | None) -> tuple[str, tuple[HubFile, ...]]:
    """The commit a revision names, and the files at that commit. Every name the server sends
    is checked here, before any of it becomes a path in the cache."""
    api = _api()
    with _hub_errors(repo, revision):
        info = api.repo_info(repo, revision=revision, timeout=REQUEST_TIMEOUT_S)
        commit = _checked_commit(repo, info.sha)
        try:
            files = tuple(
                _checked_file(repo, entry)
                for entry in api.list_repo_tree(repo, revision=commit, recursive=True)
                if hasattr(entry, "blob_id")
            )
        except (KeyError, TypeError) as error:  # an entry without the fields a file has
            raise SourceError(
                f"the Hub sent a malformed file listing for {repo} (missing or wrong {error}); "
                "refusing it"
            ) from None
    return commit, files


def _checked_commit(repo: str, commit: object) -> str:
    if not isinstance(commit, str) or not _GIT_SHA1.fullmatch(commit):
        raise SourceError(
            f"the Hub sent an invalid commit for {repo} ({_shown(commit)}): not a git commit id; "
            "refusing it"
        )
    return commit


def _checked_file(repo: str, entry: Any) -> HubFile:
    path = entry.path
    if not isinstance(path, str) or not is_safe_relative_path(path):
        raise SourceError(
            f"the Hub listed an unsafe file path in {repo} ({_shown(path)}); refusing the listing"
        )
    size = entry.size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(f"the Hub listed an invalid size for {repo}/{path} ({_shown(size)})")
    if not isinstance(entry.blob_id, str) or not _GIT_SHA1.fullmatch(entry.blob_id):
        raise SourceError(
            f"the Hub listed an invalid git blob id for {repo}/{path} ({_shown(entry.blob_id)})"
        )
    sha256 = entry.lfs.sha256 if entry.lfs else None
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.fullmatch(sha256)):
        raise SourceError(f"the Hub listed an invalid sha256 for {repo}/{path} ({_shown(sha256)})")
    return HubFile(path, size, entry.blob_id, sha256)


def _checked_etag(repo: str, hub_file: HubFile, etag: str | None) -> str:
    """The blob's name in the cache: the server's ETag, which must be a digest (a git blob id
    or a sha256), never a path."""
    if not etag:
        return hub_file.cache_name  # checked with the listing
    if not (_GIT_SHA1.fullmatch(etag) or _SHA256.fullmatch(etag)):
        raise SourceError(
            f"the Hub sent an invalid ETag for {repo}/{hub_file.path} ({_shown(etag)}): not a "
            "sha256 or git blob id; refusing it"
        )
    return etag


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def select(repo: str, files: tuple[HubFile, ...], patterns: tuple[str, ...]) -> tuple[HubFile, ...]:
    chosen = tuple(
        f for f in files if "/" not in f.path and any(fnmatch.fnmatch(f.path, p) for p in patterns)
    )
    names = {f.path for f in chosen}
    if "config.json" not in names:
        raise SourceError(f"{repo} has no config.json: not a Hugging Face model repository")
    if not any(name.endswith(".safetensors") for name in names):
        if any(f.path.endswith((".bin", ".pth")) for f in files):
            raise SourceError(
                f"{repo} has only pickle weights (.bin/.pth); llamachat installs safetensors only"
            )
        raise SourceError(f"{repo} has no safetensors weights")
    return chosen


def download(repo: str, commit: str, files: tuple[HubFile, ...], progress: Progress) -> Snapshot:
    """Every file of `files` in the cache's snapshot folder for `commit`, each verified."""
    total = sum(f.size for f in files)
    task = progress.task(f"downloading {repo}", total)
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        task.update(done)

    snapshot = _cache_folder(repo) / "snapshots" / commit
    digests = {}
    with _hub_errors(repo, commit):
        for hub_file in files:
            target = snapshot / hub_file.path
            digest = _cached_sha256(repo, target, hub_file)
            if digest is None:
                _fetch(repo, commit, hub_file, advance)
                digest = _verified_sha256(repo, target, hub_file)
            else:
                advance(hub_file.size)
            digests[hub_file.path] = digest
    task.finish()
    return Snapshot(repo, commit, snapshot, files, digests)


def _fetch(repo: str, commit: str, hub_file: HubFile, advance: Callable[[int], None]) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(repo, hub_file.path, revision=commit)
    metadata = get_hf_file_metadata(url, timeout=REQUEST_TIMEOUT_S)
    etag = _checked_etag(repo, hub_file, metadata.etag)
    storage = _cache_folder(repo)
    blob = storage / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():
            advance(hub_file.size)
        else:
            partial = blob.with_name(blob.name + ".incomplete")
            # Credentials go to the Hub only, never to the storage a file is redirected to.
            same_host = urlsplit(metadata.location).netloc == urlsplit(constants.ENDPOINT).netloc
            headers = build_hf_headers() if same_host else {}
            _transfer(metadata.location, headers, partial, hub_file, advance)
            os.replace(partial, blob)
    link = storage / "snapshots" / commit / hub_file.path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks here: keep a copy, as huggingface_hub does
        link.write_bytes(blob.read_bytes())


def _transfer(
    url: str,
    headers: dict[str, str],
    partial: Path,
    hub_file: HubFile,
    advance: Callable[[int], None],
) -> None:
    """Fill `partial` up to the file's size, asking only for the bytes it lacks. A dropped
    connection is retried while it makes progress; then the error goes up, and the partial file
    stays for the next pull."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > hub_file.size:
        partial.unlink()
        have = 0
    advance(have)
    stalled = 0
    while have < hub_file.size:
        before = have
        try:
            have = _append_range(url, headers, partial, have, advance)
            if have < hub_file.size:
                raise ConnectionError(f"the server sent {have} of {hub_file.size} bytes")
        except _NetworkError as failure:
            if isinstance(failure.cause, urllib.error.HTTPError) and failure.cause.code < 500:
                raise failure.cause from None
            stalled = 0 if have > before else stalled + 1
            if stalled >= MAX_STALLED_ATTEMPTS:
                raise SourceError(
                    f"the download of {hub_file.path} stopped at {have} of {hub_file.size} bytes "
                    f"({_reason(failure.cause)}); run the pull again to resume it"
                ) from None
            time.sleep(0.25 * 2**stalled)
        except ConnectionError as short:
            stalled += 1
            if stalled >= MAX_STALLED_ATTEMPTS:
                raise SourceError(
                    f"the download of {hub_file.path} {short}; run the pull again"
                ) from None


class _NetworkError(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _append_range(
    url: str, headers: dict[str, str], partial: Path, have: int, advance: Callable[[int], None]
) -> int:
    """Request bytes from `have` on and append them; returns the new length. Network failures
    come out as _NetworkError; a disk that fills up raises its own OSError at once."""
    request = urllib.request.Request(url, headers={**headers, "Range": f"bytes={have}-"})
    try:
        response = urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)
    except (OSError, HTTPException) as error:
        raise _NetworkError(error) from None
    with response:
        if response.status == 200 and have:  # the server ignored the range: start over
            advance(-have)
            have = 0
        with open(partial, "ab" if have else "wb") as out:
            while True:
                try:
                    block = response.read(1 << 20)
                except (OSError, HTTPException) as error:
                    raise _NetworkError(error) from None
                if not block:
                    return have
                out.write(block)
                have += len(block)
                advance(len(block))


def _cached_sha256(repo: str, path: Path, hub_file: HubFile) -> str | None:
    """The sha256 of the file already in the cache, or None when it is not there or not the
    file (damaged since, say through an installed model hard-linked to it): then it is
    removed, to be fetched again."""
    if not path.exists():
        return None
    if path.stat().st_size == hub_file.size:
        sha256, actual, expected = _checked_digests(path, hub_file)
        if actual == expected:
            return sha256
    _discard(repo, path)
    return None


def _verified_sha256(repo: str, path: Path, hub_file: HubFile) -> str:
    sha256, actual, expected = _checked_digests(path, hub_file)
    if actual != expected:
        _discard(repo, path)  # so that the next pull fetches it again
        raise IntegrityError(
            f"{repo}/{hub_file.path} is corrupt (checksum {actual[:12]}…, expected "
            f"{expected[:12]}…); it was removed from the cache: run the pull again"
        )
    return sha256


def _checked_digests(path: Path, hub_file: HubFile) -> tuple[str, str, str]:
    """The file's sha256, and the digest the Hub gives for it with the Hub's value: sha256 for
    LFS files, the git blob id for the rest."""
    sha256, git_sha1 = _digests(path)
    if hub_file.sha256:
        return sha256, sha256, hub_file.sha256
    return sha256, git_sha1, hub_file.blob_id


def _discard(repo: str, path: Path) -> None:
    """Take a bad copy out of the cache: the snapshot's link, and the blob it points to if that
    is one of this repo's blobs (a link left by something else may point anywhere)."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob.parent == (_cache_folder(repo) / "blobs").resolve():
        blob.unlink(missing_ok=True)


def _digests(path: Path) -> tuple[str, str]:
    """sha256 and git blob sha1 of a file, in one read."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1()
    git.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            sha256.update(block)
            git.update(block)
    return sha256.hexdigest(), git.hexdigest()


def _cache_folder(repo: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def _api():
    from huggingface_hub import HfApi

    return HfApi()


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """Turns huggingface_hub's exceptions into one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{repo}"
    try:
        yield
    except GatedRepoError:
        raise SourceError(
            f"{repo} is gated: accept its licence at {page}, then set HF_TOKEN to a token "
            "of the account that accepted it"
        ) from None
    except RepositoryNotFoundError:
        private = "" if os.environ.get("HF_TOKEN") else " (or it is private: set HF_TOKEN)"
        raise SourceError(
            f"no model repository {repo} on the Hub{private}; check the name"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo} has no revision {revision!r}") from None
    except urllib.error.HTTPError as error:
        raise SourceError(
            f"the server answered {error.code} for a file of {repo}; try again later"
        ) from None
    except (
        *_transport_errors(),
        LocalEntryNotFoundError,
        urllib.error.URLError,
        ConnectionError,
    ) as error:
        raise SourceError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_reason(error)}); "
            "check the network, or HF_ENDPOINT"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "an error"
        raise SourceError(f"the Hub answered {status} for {repo}; try again later") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP client this huggingface_hub uses."""
    classes: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            classes.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def _reason(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    text = str(cause or error).strip().splitlines()
    return text[0] if text else type(error).__name__
