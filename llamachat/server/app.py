"""The FastAPI app: OpenAI's routes over backend chats, by model name."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backends.base import BackendError, Chat, Logprob, ReplyStats, TokenLogprob
from .errors import ApiError, error_response, unsupported
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest, conversation
from .runner import Gate, Run

_TYPE_NAME = re.compile(r"str|int|float|bool|none|(list|dict|literal|function-\w+)\[.*|[A-Z]\w*")
Body = TypeVar("Body", bound=BaseModel)
log = logging.getLogger("llamachat.server")
FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class Served:
    """What the app serves: the chats by model name, a gate each, the metrics."""

    def __init__(self, chats: dict[str, Chat], max_batch: int, max_queue: int):
        self.chats = chats
        self.metrics = Metrics()
        self.metrics.watch(lambda: {name: chat.load() for name, chat in chats.items()})
        self.gates = {name: Gate(name, max_batch, max_queue, self.metrics) for name in chats}
        self.created = int(time.time())

    def chat(self, model: str) -> tuple[Chat, Gate]:
        if model not in self.chats:
            served = ", ".join(sorted(self.chats))
            raise ApiError(
                404,
                f"the model {model!r} is not served here (served: {served})",
                "model",
                "model_not_found",
            )
        return self.chats[model], self.gates[model]

    def count(self, model: str, stats: ReplyStats) -> None:
        self.metrics.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        self.metrics.cached_tokens.labels(model).inc(stats.reused_tokens)
        self.metrics.generated_tokens.labels(model).inc(stats.generated_tokens)

    def model_card(self, name: str) -> dict[str, Any]:
        info = self.chats[name].info
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "llamachat",
            "context_length": info.context_length,  # the most the model takes
            "max_model_len": info.context_size,  # the window it is served with
        }


def create_app(
    chats: dict[str, Chat], api_key: str | None = None, max_queue: int = 64, max_batch: int = 8
) -> FastAPI:
    """An app serving `chats` (opened backend chats by model name). With `api_key`, every route
    but /health needs `Authorization: Bearer KEY`. Up to `max_batch` replies of a model run at
    once and `max_queue` more wait; beyond that a request gets 503 with Retry-After."""
    served = Served(chats, max_batch, max_queue)
    app = FastAPI(title="llamachat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_middleware(_Guard, key=api_key.encode() if api_key else None, served=served)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _invalid(error.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")  # the traceback to the log, never to the client
        return error_response(500, f"internal error: {type(error).__name__}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.model_card(name) for name in served.chats]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        served.chat(model)
        return served.model_card(model)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        # vLLM's route, for a conversation: the count and the window, not the token ids.
        body = await _parsed(request, TokenizeRequest)
        chat, _ = served.chat(body.model)
        try:
            use = await run_in_threadpool(chat.context_use, conversation(body.messages))
        except BackendError as error:  # a template that rejects the conversation
            raise ApiError(400, str(error), "messages") from None
        return {"count": use.used, "max_model_len": use.window}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parsed(request, ChatCompletionRequest)
        body.check_supported()
        chat, gate = served.chat(body.model)
        messages, reply_request = body.conversation(), body.to_reply_request()
        if reply_request.continue_reply and not chat.info.continues_replies:
            # The single-session chat (--max-batch 1) would start a new reply instead.
            raise unsupported("continue_final_message", "continuing a reply with --max-batch 1")
        asked = reply_request.logprobs is not None
        run = await _started(
            gate, chat, lambda cancel: chat.reply(messages, cancel=cancel, request=reply_request)
        )
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            frame = _frame(ident, "chat.completion.chunk", created, body.model)

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                yield frame(delta={"role": "assistant", "content": ""})
                async for text, logprobs in run.pieces_with_logprobs():
                    if not asked:
                        yield frame(delta={"content": text})
                    elif text or logprobs:
                        yield frame(delta={"content": text}, logprobs=_content(logprobs))
                yield frame(delta={}, finish_reason=_finish(run.stats))
                if body.include_usage:
                    yield {**frame(), "choices": [], "usage": _usage(run.stats)}

            return EventStream(chunks(), run, served, body.model)
        text, logprobs = await _whole(request, run)
        served.count(body.model, run.stats)
        whole = _frame(ident, "chat.completion", created, body.model)(
            message={"role": "assistant", "content": text},
            logprobs=_content(logprobs) if asked else None,
            finish_reason=_finish(run.stats),
        )
        return JSONResponse({**whole, "usage": _usage(run.stats)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parsed(request, CompletionRequest)
        body.check_supported()
        chat, gate = served.chat(body.model)
        prompt, reply_request = body.text, body.to_reply_request()
        asked = reply_request.logprobs is not None
        run = await _started(
            gate, chat, lambda cancel: chat.complete(prompt, cancel=cancel, request=reply_request)
        )
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            frame = _frame(ident, "text_completion", created, body.model)

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                offset = 0  # of the chunk's first token, in the whole completion's text
                async for text, logprobs in run.pieces_with_logprobs():
                    if not asked:
                        yield frame(text=text)
                    elif text or logprobs:
                        yield frame(text=text, logprobs=_legacy(logprobs, offset))
                        offset += sum(len(token.text) for token in logprobs)
                yield frame(text="", finish_reason=_finish(run.stats))
                if body.include_usage:
                    yield {**frame(), "choices": [], "usage": _usage(run.stats)}

            return EventStream(chunks(), run, served, body.model)
        text, logprobs = await _whole(request, run)
        served.count(body.model, run.stats)
        whole = _frame(ident, "text_completion", created, body.model)(
            text=text,
            logprobs=_legacy(logprobs, 0) if asked else None,
            finish_reason=_finish(run.stats),
        )
        return JSONResponse({**whole, "usage": _usage(run.stats)})

    return app


async def _started(gate: Gate, chat: Chat, start: Callable) -> Run:
    await gate.enter()
    run = Run(start, gate, chat)
    await run.start()
    return run


async def _whole(request: Request, run: Run) -> tuple[str, list[TokenLogprob]]:
    """The reply's whole text and logprobs, for a response that is not streamed. A client that
    goes away before the reply ends cancels it (ApiError 499, which only the metrics see)."""

    async def watch_disconnect() -> None:
        # The body is read: what the connection sends next is its end.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        run.cancel.set()

    watcher = asyncio.create_task(watch_disconnect())
    pieces, logprobs = [], []
    try:
        async for text, given in run.pieces_with_logprobs():
            pieces.append(text)
            logprobs.extend(given)
    finally:
        watcher.cancel()
    if run.cancel.is_set():
        raise ApiError(499, "the client closed the connection before the reply ended")
    return "".join(pieces), logprobs


class _Guard:
    """Every request: the key checked (but for /health), and counted by route and status once
    answered. Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp, key: bytes | None, served: Served):
        self.app = app
        self.key = key
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorised(scope):
                message = "a valid API key is needed: Authorization: Bearer KEY"
                refused = error_response(401, message, code="invalid_api_key")
                await refused(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.served.metrics.requests.labels(route, str(status)).inc()

    def _authorised(self, scope: Scope) -> bool:
        assert self.key is not None
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # Compared in constant time, so a wrong key's timing says nothing about the right one.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


# Characters JSON leaves as they are that Python's str.splitlines (and clients reading events
# with it, such as httpx's iter_lines) takes for line ends: inside an event they would cut it.
_LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(chunk: dict[str, Any]) -> bytes:
    """One server-sent event holding `chunk` as JSON on one line, whatever text it carries."""
    line = json.dumps(chunk, ensure_ascii=False).translate(_LINE_BREAKING)
    return f"data: {line}\n\n".encode()


class EventStream(Response):
    """Server-sent events, one `data:` line per chunk, then `data: [DONE]`. A client that goes
    away (a failed send, or the disconnect message) cancels the reply; its worker then ends."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], run: Run, served: Served, model):
        super().__init__()
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        self.chunks = chunks
        self.run_ = run
        self.served = served
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.run_.cancel.set()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                if self.run_.cancel.is_set():
                    break
                body = sse_data(chunk)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
                self.served.count(self.model, self.run_.stats)
                return
            await send({"type": "http.response.body", "body": b""})
        except ApiError as error:  # the reply failed after the headers went out
            body = json.dumps(json.loads(error.response().body))
            await send({"type": "http.response.body", "body": f"data: {body}\n\n".encode()})
        except OSError:
            pass  # the client went away mid-send
        finally:
            self.run_.cancel.set()  # a no-op for a reply that ended; else its worker stops
            watcher.cancel()
            await self.chunks.aclose()


def _frame(ident: str, kind: str, created: int, model: str):
    """A maker of this response's objects (a streamed chunk, or the whole reply): a choice
    when given its fields or a finish reason, else none (a usage-only chunk)."""

    def frame(
        finish_reason: str | None = None, logprobs: Any = None, **fields: Any
    ) -> dict[str, Any]:
        choice = {"index": 0, **fields, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": ident, "object": kind, "created": created, "model": model,
                "choices": [choice] if fields or finish_reason else []}  # fmt: skip

    return frame


def _content(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object for these tokens."""

    def entry(item: Logprob) -> dict[str, Any]:
        return {"token": item.token, "logprob": item.logprob, "bytes": list(item.bytes)}

    return {
        "content": [
            {**entry(t.chosen), "top_logprobs": [entry(alt) for alt in t.top]} for t in logprobs
        ],
        "refusal": None,
    }


def _legacy(logprobs: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's `logprobs` object for these tokens, the first of them at character
    `offset` of the completion: each token as the text it adds (so that they join to the text),
    its log probability, its alternatives by their text, and where it starts."""
    offsets = []
    for token in logprobs:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in logprobs],
        "token_logprobs": [token.chosen.logprob for token in logprobs],
        "top_logprobs": [{alt.token: alt.logprob for alt in token.top} for token in logprobs],
        "text_offset": offsets,
    }


def _finish(stats: ReplyStats) -> str:
    return FINISH.get(stats.finish_reason or "stop", "stop")


def _usage(stats: ReplyStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
    }


async def _parsed(request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends a form's)."""
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _invalid(error.errors()) from None


def _invalid(errors: Sequence[Any]) -> ApiError:
    """pydantic's first complaint as one OpenAI error, naming the field."""
    first = errors[0] if errors else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    # A union's members appear in the location ("str", "list[TextPart]"): not the client's.
    param = _param([part for part in where if not _TYPE_NAME.fullmatch(part)])
    text = first.get("msg", "invalid value")
    return ApiError(400, f"{param}: {text}" if param else text, param or None, "invalid_value")


def _param(where: list[str]) -> str:
    """pydantic's location (["messages", "0", "content"]) as OpenAI's param: messages[0].content."""
    text = ""
    for part in where:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text
