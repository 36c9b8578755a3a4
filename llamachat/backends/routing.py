"""Every model the user can chat with, behind one Backend: each remote's as NAME/MODEL, and the
installed ones, through a `llamachat serve` on this machine that has the model loaded (it
answers at once) or else in this process.

Nothing here imports torch until a local chat opens, nor httpx until a remote is reached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..kv_files import ContextFiles
from ..models.store import ModelStore
from ..remotes import Remote, split_model
from ..serving import RunningServer, running
from .base import BackendError, Chat, ChatSpec, ModelInfo

if TYPE_CHECKING:
    from ..engine.templated import Templating

SERVER_KEY_ENV = "LLAMACHAT_API_KEY"  # what `llamachat serve` takes its key from


@dataclass
class Router:
    """`runtime`: the folder where running servers record themselves; None never uses one (a
    chat that must run in this process: --local, or a placement flag a server cannot honour).
    `contexts`: where a chat in this process keeps conversations' KV caches (instant resume);
    None keeps none."""

    store: ModelStore
    remotes: dict[str, Remote]
    runtime: Path | None = None
    contexts: ContextFiles | None = None

    def __post_init__(self) -> None:
        # What the last models() could not list, by remote name: why.
        self.unreachable: dict[str, str] = {}

    def models(self) -> list[ModelInfo]:
        """The installed models, then each remote's (asked at once; one that does not answer
        within its short timeout is left out, and said in `unreachable`)."""
        from .local import LocalBackend

        found = LocalBackend(self.store).models()
        self.unreachable = {}
        if not self.remotes:
            return found
        with ThreadPoolExecutor(max_workers=min(8, len(self.remotes))) as pool:
            listings = {name: pool.submit(_listed, r) for name, r in self.remotes.items()}
        for name, listing in listings.items():
            models, problem = listing.result()
            found += models
            if problem:
                self.unreachable[name] = problem
        return found

    def open_chat(self, spec: ChatSpec) -> Chat:
        from .remote import RemoteBackend

        remote = split_model(spec.model, self.remotes)
        if remote is not None:
            server, model = remote
            return RemoteBackend(server).open_chat(replace(spec, model=model), self._twin(model))
        loaded = self.server_for(spec.model)
        if loaded is not None:
            backend = RemoteBackend(_as_remote(loaded), on_this_machine=loaded)
            try:
                return backend.open_chat(spec, self._twin(spec.model))
            except BackendError:
                backend.close()  # stopping, or its key is not ours: the model loads here
        from .local import LocalBackend

        return LocalBackend(self.store, self.contexts).open_chat(spec)

    def _twin(self, model: str) -> Callable[[], Templating] | None:
        """What opens the tokenizer and template of the installed model that a server's
        `model` is: the one of that name, else the one pulled from the Hugging Face repo of
        that name (vLLM names a model by its repo); None when there is none."""
        installed = {m.name: m for m in self.store.installed()}
        twin = installed.get(model) or next(
            (m for m in installed.values() if m.manifest.source.split("@")[0] == f"hf:{model}"),
            None,
        )
        if twin is None:
            return None
        from ..engine.templated import Templating

        return lambda: Templating(twin.path)

    def server_for(self, model: str) -> RunningServer | None:
        """A server on this machine that has installed model `model` loaded, and that this
        process can use (it has the key a server started with one asks for)."""
        if self.runtime is None:
            return None
        for server in running(self.runtime):
            if server.serves(model) and (not server.key or os.environ.get(SERVER_KEY_ENV)):
                return server
        return None


def _as_remote(server: RunningServer) -> Remote:
    return Remote(
        name="the local server",
        url=server.url,
        api_key_env=SERVER_KEY_ENV if server.key else None,
    )


def _listed(remote: Remote) -> tuple[list[ModelInfo], str | None]:
    from .remote import RemoteBackend

    backend = RemoteBackend(remote)
    try:
        return backend.models(), None
    except BackendError as error:
        return [], str(error)
    finally:
        backend.close()
