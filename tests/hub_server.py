"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub and
llamachat use, serving model folders from disk, with faults to order.

    GET  /api/models/{repo}/revision/{rev}         → {"id", "sha", "siblings"}
    GET  /api/models/{repo}/tree/{commit}          → [{"type", "path", "size", "oid", "lfs"}]
    HEAD /{repo}/resolve/{commit}/{file}           → X-Repo-Commit, ETag / X-Linked-Etag, sizes
    GET  /{repo}/resolve/{commit}/{file}           → the bytes, honouring Range

A hostile server is ordered through `Lies`: what it claims in place of the truth.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Fault:
    cut_after: int | None = None  # close the connection after this many bytes of a response
    then_refuse: int = 0  # after the cut, answer 503 to this many requests for the file
    refuse: int = 0  # answer 503 to this many requests for the file
    corrupt: bool = False  # flip one byte of what is sent
    bytes_per_second: float | None = None  # throttle


@dataclass
class Lies:
    """What a hostile or broken server claims instead of the truth, per repo."""

    commit: str | None = None  # the commit the revision answer names (then served as that)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # file → headers to send
    tree: dict[str, dict[str, object]] = field(default_factory=dict)  # file → entry fields
    extra_tree: list[dict[str, object]] = field(default_factory=list)  # entries to add


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    gated: bool = False
    lies: Lies = field(default_factory=Lies)

    @property
    def advertised_commit(self) -> str:
        return self.lies.commit if self.lies.commit is not None else self.commit

    def knows(self, revision: str | None) -> bool:
        return revision in (None, "main", self.commit, self.advertised_commit)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    sent: int  # body bytes sent


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: dict[tuple[str, str], Fault] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def add_folder(self, repo_id: str, folder: Path, gated: bool = False) -> Repo:
        files = {
            path.name: HubFile(
                path.name, path.read_bytes(), lfs=path.suffix in (".safetensors", ".bin")
            )
            for path in sorted(folder.iterdir())
            if path.is_file()
        }
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(f.data for f in files.values())
        ).hexdigest()
        repo = Repo(repo_id, commit, files, gated)
        self.repos[repo_id] = repo
        return repo

    def downloads(self, path: str) -> list[Request]:
        """The GET requests for a file's bytes."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.path.endswith("/" + path) and "/resolve/" in r.path
        ]

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_REVISION = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?")
_TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, send_body: bool) -> None:
        # Matched before unquoting: a revision may hold an escaped '/'.
        path = urlsplit(self.path).path
        for pattern, handler in (
            (_REVISION, self._revision),
            (_TREE, self._tree),
            (_RESOLVE, self._resolve),
        ):
            match = pattern.fullmatch(path)
            if match:
                repo_id, *rest = (None if g is None else unquote(g) for g in match.groups())
                repo = self._repo(repo_id)
                if repo is not None:
                    handler(repo, *rest, send_body=send_body)
                return
        self._error(404, "RepoNotFound")

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            self._error(
                401, "GatedRepo", "Access to model is restricted. You must be authenticated."
            )
            return None
        return repo

    def _revision(self, repo: Repo, revision: str | None, send_body: bool) -> None:
        if not repo.knows(revision):
            self._error(404, "RevisionNotFound")
            return
        self._json(
            {
                "id": repo.repo_id,
                "sha": repo.advertised_commit,
                "siblings": [{"rfilename": p} for p in repo.files],
            }
        )

    def _tree(self, repo: Repo, revision: str, send_body: bool) -> None:
        if not repo.knows(revision):
            self._error(404, "RevisionNotFound")
            return
        entries = []
        for hub_file in repo.files.values():
            entry = {
                "type": "file",
                "path": hub_file.path,
                "size": len(hub_file.data),
                "oid": hub_file.blob_id,
            }
            if hub_file.lfs:
                entry["lfs"] = {
                    "oid": hub_file.sha256,
                    "size": len(hub_file.data),
                    "pointerSize": 134,
                }
            entries.append({**entry, **repo.lies.tree.get(hub_file.path, {})})
        self._json(entries + repo.lies.extra_tree)

    def _resolve(self, repo: Repo, revision: str, name: str, send_body: bool) -> None:
        hub_file = repo.files.get(name)
        if not repo.knows(revision) or hub_file is None:
            self._error(404, "EntryNotFound")
            return
        fault = self.fake.faults.get((repo.repo_id, name), Fault())
        if send_body and fault.refuse > 0:
            fault.refuse -= 1
            self._error(503, None, "busy")
            return
        data = hub_file.data
        if fault.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        wanted = self.headers.get("Range")
        if send_body and wanted:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
        self.send_response(206 if start else 200)
        headers = {"X-Repo-Commit": repo.advertised_commit, "ETag": f'"{hub_file.etag}"'}
        if hub_file.lfs:
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Size"] = str(len(data))
        headers.update(repo.lies.headers.get(name, {}))
        headers["Accept-Ranges"] = "bytes"
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        for header, value in headers.items():
            self.send_header(header, value)
        self.end_headers()
        sent = 0
        if send_body:
            sent = self._send(data[start:], fault)
        self.fake.requests.append(Request(self.command, self.path, wanted, sent))

    def _send(self, body: bytes, fault: Fault) -> int:
        chunk = 64 * 1024
        sent = 0
        limit = len(body) if fault.cut_after is None else min(len(body), fault.cut_after)
        try:
            while sent < limit:
                piece = body[sent : min(sent + chunk, limit)]
                self.wfile.write(piece)
                sent += len(piece)
                if fault.bytes_per_second:
                    time.sleep(len(piece) / fault.bytes_per_second)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if sent < len(body):
            self.close_connection = True
            fault.cut_after = None  # one cut per fault
            fault.refuse = fault.then_refuse
        return sent

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.fake.requests.append(Request(self.command, self.path, None, len(body)))

    def _error(self, status: int, code: str | None, message: str = "") -> None:
        body = json.dumps({"error": message or code}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.fake.requests.append(Request(self.command, self.path, None, 0))
