"""Models on an OpenAI-compatible server (`llamachat serve`, vLLM, llama.cpp's server,
ollama), behind the backend interface: replies are streamed chat completions over HTTP.

Everything the server sends is checked before it is used: an answer that is not what the API
says is a BackendError naming the server, never a KeyError. The key goes in the Authorization
header only, never into an error message.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import httpx

from ..engine.prompts import Templated
from ..remotes import Remote
from ..serving import RunningServer
from .base import (
    BackendError,
    BackendGoneError,
    ChatInfo,
    ChatLoad,
    ChatMessage,
    ChatSpec,
    ContextUse,
    ModelInfo,
    ModelUnavailableError,
    PromptTooLongError,
    ReplyRequest,
    ReplyStats,
    Sampling,
    TokenLogprob,
)
from .fitting import RemoteFitter

CONNECT_TIMEOUT_S = 5.0  # a server that does not answer this soon is down or unreachable
READ_TIMEOUT_S = 300.0  # the longest wait for the next piece (a long prompt is read first)
LIST_TIMEOUT_S = 5.0  # `llamachat list` asks every remote; none may hold it up for long
RETRIES = 3  # a busy server (429, 503) is asked again this many times
MOST_RETRY_WAIT_S = 10.0
DEFAULT_MAX_TOKENS = 1024
FINISH = {"stop": "stop", "length": "length", "eos": "stop", "content_filter": "stop"}


class RemoteBackend:
    """One remote's models; `open_chat` takes the model's id on the server (spec.model).
    `on_this_machine`: the remote is a llamachat server here, serving installed models under
    their own names, which its chats keep (the history does not tell them apart)."""

    def __init__(self, remote: Remote, on_this_machine: RunningServer | None = None):
        self.remote = remote
        self._here = on_this_machine
        key = remote.api_key()
        # One client for the backend's requests, its connection kept for the next (a chat's
        # replies, the listing before them). Its TLS context, which takes longer to build than
        # a loopback reply takes to start, only where the URL is https.
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            verify=_is_https(remote.url),
        )

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(f"{self.remote.name}/{model}", f"on {self.remote.url}")
            for model in self.served()
        ]

    def served(self, timeout: float = LIST_TIMEOUT_S) -> dict[str, int | None]:
        """The models the server serves by id, each with the context length it gives it:
        llamachat's and vLLM's max_model_len, else a context_length; None where it does not
        say."""
        data = self._get("/models", timeout)
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise BackendError(f"{self.remote.url}/models did not list models")
        served: dict[str, int | None] = {}
        for card in cards:
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                served[_shown(card["id"], 200)] = _window_of(card)
        return served

    def open_chat(self, spec: ChatSpec, twin: Callable[[], Templated] | None = None) -> RemoteChat:
        """`twin`: opens the model's tokenizer and template here (it is installed here too),
        to fit conversations to the server's window exactly rather than by estimate."""
        window = self.window(spec.model)
        if spec.ctx is not None and window is not None and spec.ctx > window:
            raise ModelUnavailableError(
                f"--ctx {spec.ctx} is larger than the {window} tokens {self.remote.name} serves"
                f" {spec.model} with"
            )
        size = spec.ctx or window or 0
        info = ChatInfo(
            model=f"{self.remote.name}/{spec.model}",
            device=f"remote {self.remote.url}",
            dtype="-",
            weight_format=None,
            threads=None,
            context_size=size,
            context_length=window or size,
            max_tokens=spec.max_tokens or DEFAULT_MAX_TOKENS,
            # Asked of the server (vLLM's extension); one without it starts a new reply.
            continues_replies=True,
        )
        here = self._here.models if self._here is not None else ()
        loaded = next((model for model in here if model.name == spec.model), None)
        if self._here is not None and loaded is not None:
            info = replace(
                info,
                model=spec.model,
                device=f"{loaded.device} (llamachat server, pid {self._here.pid})",
                dtype=loaded.dtype,
                weight_format=loaded.weight_format,
            )
        fitter = RemoteFitter(size, twin, lambda messages: self.count(spec.model, messages))
        return RemoteChat(self, spec.model, info, spec.sampling, fitter)

    def count(self, model: str, messages: Sequence[ChatMessage]) -> int | None:
        """The server's count of the conversation's tokens, templated (vLLM's /tokenize, at the
        server's root); None where it has no such route or says nothing usable."""
        root = self.remote.url.removesuffix("/v1")
        body = {"model": model, "messages": [dict(m) for m in messages]}
        try:
            response = self._client.post(f"{root}/tokenize", json=body, timeout=LIST_TIMEOUT_S)
            count = response.json().get("count") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    def window(self, model: str) -> int | None:
        """The context length the server gives the model (None where it does not say); a
        model it does not serve is refused here, naming those it does."""
        served = self.served(CONNECT_TIMEOUT_S * 2)
        if model not in served:
            names = sorted(served)
            listed = ", ".join(_shown(i, 80) for i in names[:20]) or "none"
            more = f" and {len(names) - 20} more" if len(names) > 20 else ""
            raise ModelUnavailableError(
                f"{self.remote.name} has no model {model!r} (it serves: {listed}{more})"
            )
        return served[model]

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, timeout: float) -> Any:
        url = self.remote.url + path
        try:
            response = self._client.get(url, timeout=timeout)
        except httpx.HTTPError as error:
            raise _unreachable(self.remote, error, timeout, timeout) from None
        if response.status_code != 200:
            raise _refused(self.remote, response.status_code, response.text)
        try:
            return response.json()
        except ValueError:
            raise BackendError(f"{url} did not answer with JSON") from None

    def stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST a streamed request, asking again while the server says it is busy; the open
        response, its status 200 checked."""
        client = self._client
        for attempt in range(RETRIES + 1):
            try:
                request = client.build_request("POST", self.remote.url + path, json=body)
                response = client.send(request, stream=True)
            except httpx.HTTPError as error:
                raise _unreachable(self.remote, error, CONNECT_TIMEOUT_S, READ_TIMEOUT_S) from None
            if response.status_code == 200:
                return response
            text = response.read().decode("utf-8", errors="replace")
            response.close()
            if response.status_code in (429, 503) and attempt < RETRIES:
                time.sleep(_retry_after(response.headers.get("retry-after"), attempt))
                continue
            raise _refused(self.remote, response.status_code, text)
        raise AssertionError("unreachable")  # the loop returns or raises


class RemoteChat:
    """A model on a remote server; each reply sends the whole conversation (the server may
    reuse what it computed for the last one: llamachat's and vLLM's do)."""

    def __init__(
        self,
        backend: RemoteBackend,
        model: str,
        info: ChatInfo,
        sampling: Sampling,
        fitter: RemoteFitter,
    ):
        self._backend = backend
        self._model = model
        self._info = info
        self._sampling = sampling
        self._fitter = fitter

    @property
    def info(self) -> ChatInfo:
        return self._info

    def reply(
        self,
        messages: Sequence[ChatMessage],
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> RemoteReply:
        request = request or ReplyRequest()
        prompt = self._fitter.fit(messages, request.max_tokens or self._info.max_tokens)
        sent = [m for index, m in enumerate(messages) if index not in prompt.dropped]
        body = self._body(request)
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in sent]
        body["max_tokens"] = prompt.max_new_tokens
        if request.continue_reply:
            # vLLM's extension (and llamachat serve's): a server without it starts a new reply.
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        reply = self._start("/chat/completions", body, cancel)
        reply.fitted(prompt.dropped, len(prompt.token_ids), lambda n: self._fitter.counted(sent, n))
        return reply

    def complete(
        self,
        prompt: str,
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> RemoteReply:
        body = self._body(request or ReplyRequest())
        body["prompt"] = prompt
        return self._start("/completions", body, cancel)

    def context_use(self, messages: Sequence[ChatMessage]) -> ContextUse:
        return self._fitter.use(messages)

    def load(self) -> ChatLoad:
        return ChatLoad(running=0, waiting=0, last_batch=0, kv_tokens=0, kv_capacity=0)

    def save_context(self, key: str) -> int | None:
        return None  # the server keeps what it computed as long as it can

    def restore_context(self, key: str) -> int:
        return 0

    def close(self) -> None:
        self._backend.close()

    def _body(self, request: ReplyRequest) -> dict[str, Any]:
        sampling = request.sampling or self._sampling
        body: dict[str, Any] = {
            "model": self._model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens or self._info.max_tokens,
        }
        # Sent only when chosen: OpenAI's fields, then llamachat's and llama.cpp's own, which
        # vLLM takes too but for the penalty's name (each server ignores the name it lacks;
        # ollama's OpenAI routes take neither, nor top_k and min_p: docs/REMOTES.md).
        for field, value in sampling.chosen().items():
            body[field] = value
        if sampling.repeat_penalty is not None:
            body["repetition_penalty"] = sampling.repeat_penalty
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    def _start(self, path: str, body: dict[str, Any], cancel: threading.Event | None):
        started = time.perf_counter()
        response = self._backend.stream(path, body)
        return RemoteReply(response, self._backend.remote, started, cancel or threading.Event())


class RemoteReply:
    """One streamed reply: server-sent events of chat (or text) completion chunks."""

    def __init__(
        self,
        response: httpx.Response,
        remote: Remote,
        started: float,
        cancel: threading.Event,
    ):
        self._response = response
        self._remote = remote
        self._started = started
        self._cancel = cancel
        self._stats = ReplyStats()
        self._consumed = False
        self.logprobs: list[TokenLogprob] = []
        self._dropped: tuple[int, ...] = ()
        self._expected = 0  # the prompt's tokens as fitting counted them, till the server's
        self._counted: Callable[[int], None] | None = None

    def fitted(self, dropped: tuple[int, ...], tokens: int, counted: Callable[[int], None]):
        """The messages fitting left out, the tokens it counted, and what to tell of the
        server's own count once it comes."""
        self._dropped, self._expected, self._counted = dropped, tokens, counted

    @property
    def dropped(self) -> tuple[int, ...]:
        return self._dropped

    @property
    def prompt_tokens(self) -> int:
        return self._stats.prompt_tokens or self._expected

    @property
    def stats(self) -> ReplyStats:
        return self._stats

    def watch(self, ready) -> bool:
        return False

    def cancel(self) -> None:
        self._cancel.set()
        self._response.close()  # a read waiting for the next piece returns now

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise RuntimeError("a reply can be streamed only once")
        self._consumed = True
        stats = self._stats
        first = last = None
        try:
            for data in self._events():
                text, finish, usage = _chunk(data, self._remote)
                if usage is not None:
                    _count(stats, usage)
                if finish is not None:
                    stats.finish_reason = FINISH.get(finish, "stop")  # type: ignore[assignment]
                if text:
                    last = time.perf_counter()
                    first = first or last
                    yield text
            if stats.finish_reason is None:
                stats.finish_reason = "stop"
            if self._counted is not None and stats.prompt_tokens:
                self._counted(stats.prompt_tokens)
        except (httpx.HTTPError, OSError) as error:
            if not self._cancel.is_set():
                raise BackendError(
                    f"the reply from {self._remote.name} broke off: {_reason(error)}"
                ) from None
        finally:
            if self._cancel.is_set():
                stats.finish_reason = "cancelled"
            if first is not None:
                stats.time_to_first_token_s = first - self._started
                stats.decode_s = (last or first) - first
            self._response.close()

    def _events(self) -> Iterator[dict]:
        """The JSON of each `data:` event, up to `data: [DONE]`; an error the server sends
        in the stream is raised."""
        for line in self._response.iter_lines():
            if self._cancel.is_set():
                return
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                data = json.loads(payload)
            except ValueError:
                raise BackendError(f"{self._remote.name} sent an event that is not JSON") from None
            if not isinstance(data, dict):
                raise BackendError(f"{self._remote.name} sent an event that is not an object")
            if "error" in data:
                said = _error_text(data) or "an error without a message"
                raise BackendError(f"{self._remote.name}: {said}")
            yield data
        if not self._cancel.is_set():
            raise BackendError(f"the reply from {self._remote.name} ended without [DONE]")


def _is_https(url: str) -> bool:
    return url.lower().startswith("https:")


def _window_of(card: dict) -> int | None:
    """vLLM's and llamachat's max_model_len, else a context_length, else llama.cpp's n_ctx
    (each slot's, in `meta` in recent builds; not n_ctx_train, what the model was trained to)."""
    meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    for value in (card.get("max_model_len"), card.get("context_length"), meta.get("n_ctx")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _chunk(data: dict, remote: Remote) -> tuple[str, str | None, dict | None]:
    """A chunk's text, finish reason and usage (each possibly absent)."""
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    choices = data.get("choices") or []
    if not isinstance(choices, list):
        raise BackendError(f"{remote.name} sent a chunk whose choices are not a list")
    text, finish = "", None
    for choice in choices[:1]:
        if not isinstance(choice, dict):
            raise BackendError(f"{remote.name} sent a choice that is not an object")
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if piece is not None and not isinstance(piece, str):
            raise BackendError(f"{remote.name} sent text that is not a string")
        text = piece or ""
        reason = choice.get("finish_reason")
        finish = reason if isinstance(reason, str) else None
    return text, finish, usage


def _count(stats: ReplyStats, usage: dict) -> None:
    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    stats.prompt_tokens = number(usage.get("prompt_tokens"))
    stats.generated_tokens = number(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = number(details.get("cached_tokens")) if isinstance(details, dict) else 0
    stats.reused_tokens = min(cached, stats.prompt_tokens)
    stats.prefilled_tokens = stats.prompt_tokens - stats.reused_tokens


def _retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait before asking a busy server again: what it says, within bounds."""
    try:
        wait = float(header) if header is not None else 2.0**attempt
    except ValueError:
        wait = 2.0**attempt
    return min(max(wait, 0.1), MOST_RETRY_WAIT_S)


def _unreachable(
    remote: Remote, error: httpx.HTTPError, connect: float, read: float
) -> BackendGoneError:
    """The request's failure as one line; `connect` and `read`: the limits it had."""
    if isinstance(error, httpx.TimeoutException):
        limit = connect if isinstance(error, httpx.ConnectTimeout) else read
        return BackendGoneError(f"{remote.name} ({remote.url}) did not answer within {limit:g} s")
    return BackendGoneError(f"cannot reach {remote.name} at {remote.url}: {_reason(error)}")


def _refused(remote: Remote, status: int, text: str) -> BackendError:
    """The server's error answer as one line."""
    first_line = _shown(text.strip().splitlines()[0]) if text.strip() else f"HTTP {status}"
    try:
        said = _error_text(json.loads(text)) or first_line
    except ValueError:
        said = first_line
    if status == 401:
        if remote.api_key_env:
            how = f"set {remote.api_key_env} to its key"
        elif remote.api_key_file:
            how = f"put its key in {remote.api_key_file}"
        else:
            how = f"add it again with --api-key-env VAR: llamachat remote add {remote.name} …"
        return BackendError(f"{remote.name} refused the API key ({said}); {how}")
    if status == 400 and "context" in said.lower():
        return PromptTooLongError(f"{remote.name}: {said}")
    if status == 404:
        return ModelUnavailableError(f"{remote.name}: {said}")
    if status in (429, 503):
        return BackendError(f"{remote.name} is busy ({said}); try again later")
    return BackendError(f"{remote.name} answered {status}: {said}")


def _error_text(data: Any) -> str:
    """The message of OpenAI's error shape, {"error": {"message": …}} (or a bare string)."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return _shown(error["message"])
    if isinstance(error, str):  # vLLM's 401: {"error": "Unauthorized"}
        return _shown(error)
    flat = data.get("message") if isinstance(data, dict) and data.get("object") == "error" else None
    return _shown(flat) if isinstance(flat, str) else ""  # older vLLM: the fields at the top


def _shown(text: str, most: int = 300) -> str:
    """Text a server sent, as one line that is safe to print: control characters (a
    terminal's escape sequences among them) written out as escapes, at most `most` long."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= most else safe[:most] + "…"


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text.splitlines()[0][:200] if text else type(error).__name__
