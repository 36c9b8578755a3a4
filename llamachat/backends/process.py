"""The engine in a process of its own, behind the backend interface: what a server opens, so
that the model's thread and the server's event loop never wait for each other's turn with
Python's lock (one process each, as vLLM's API server and engine core are). The engine
process's side is worker.py; here, a thread reads its messages and hands each reply its
pieces.

Both ends are this program, started by it, so its messages are pickled objects.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from . import worker
from .base import (
    BackendError,
    BackendGoneError,
    ChatInfo,
    ChatLoad,
    ChatMessage,
    ChatSpec,
    ContextUse,
    ReplyRequest,
)
from .queued import QueuedReply

CALL_TIMEOUT_S = 5.0  # a quick question (load, context use) unanswered this long fails
CLOSE_TIMEOUT_S = 10.0  # the engine process gets this long to let go of its models


class EngineLostError(BackendGoneError):
    """The engine process ended while its chats were still in use."""


class EngineProcess:
    """A process that opens `specs` from the model store at `models` and runs their replies.
    Raises what opening them raised there."""

    def __init__(self, models: Path, specs: Sequence[ChatSpec]):
        context = multiprocessing.get_context("spawn")  # no copy of this process's threads
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=worker.main,
            args=(theirs, str(models), list(specs)),
            name="llamachat-engine",
            daemon=True,
        )
        self._process.start()
        theirs.close()
        self._on_lost: Callable[[str], None] | None = None
        self._sending = threading.Lock()
        self._ids = itertools.count()
        self._replies: dict[int, ProcessReply] = {}
        self._asked: dict[int, _Answer] = {}  # starts and calls waiting for their answer
        self._closing = False
        self._lost = False
        try:
            first = self._conn.recv()
        except EOFError:
            self._process.join()
            raise EngineLostError(self._ended()) from None
        if first[0] == worker.FAILED:
            self._process.join(CLOSE_TIMEOUT_S)
            raise first[1]
        self.chats = {name: ProcessChat(self, info) for name, info in first[1].items()}
        threading.Thread(target=self._receive, name="llamachat-engine-reader", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(
        self,
        kind: str,
        model: str,
        what,
        cancel: threading.Event | None,
        request: ReplyRequest | None,
    ) -> ProcessReply:
        """A reply started in the engine process (`kind`: worker.REPLY to messages, or
        worker.COMPLETE of a prompt); raises what its chat there raised."""
        ident = next(self._ids)
        answer = self._asked[ident] = _Answer()
        reply = self._replies[ident] = ProcessReply(self, ident, cancel or threading.Event())
        try:
            self._send((kind, ident, model, what, request or ReplyRequest()))
            prompt_tokens, dropped = answer.wait(None)
        except BaseException:
            self._replies.pop(ident, None)
            self._asked.pop(ident, None)
            raise
        reply.started(prompt_tokens, dropped)
        return reply

    def when_lost(self, call: Callable[[str], None]) -> None:
        """Have `call` told why, from another thread, if the process ends before `close`
        (at once if it has)."""
        with self._sending:
            self._on_lost = call
            lost = self._lost and not self._closing
        if lost:
            call(self._ended())

    def call(self, model: str, method: str, *args):
        ident = next(self._ids)
        answer = self._asked[ident] = _Answer()
        self._send((worker.CALL, ident, model, method, args))
        return answer.wait(CALL_TIMEOUT_S)

    def cancel(self, ident: int) -> None:
        if not self._lost:
            self._send((worker.CANCEL, ident))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._lost:
            self._send((worker.CLOSE, None))
        self._process.join(CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def _send(self, message: tuple) -> None:
        with self._sending:
            if self._lost:
                raise EngineLostError(self._ended())
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                raise EngineLostError(self._ended()) from None

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == worker.EVENTS:
                for event in message[1]:
                    self._deliver(event)
            elif kind == worker.STARTED:
                _, ident, prompt_tokens, dropped = message
                self._asked.pop(ident).give((prompt_tokens, dropped))
            elif kind in (worker.REFUSED, worker.ANSWER):
                _, ident, value = message
                answer = self._asked.pop(ident, None)
                if answer is not None:
                    answer.give(value)
        with self._sending:  # no message is sent from now on, so none waits for an answer
            self._lost = True
            on_lost = self._on_lost
        if self._closing:
            return
        self._process.join(1.0)
        lost = EngineLostError(self._ended())
        for answer in list(self._asked.values()):
            answer.give(lost)
        for reply in list(self._replies.values()):
            reply.put_failure(lost)
        if on_lost is not None:
            on_lost(str(lost))

    def _deliver(self, event: tuple) -> None:
        ident, what = event[0], event[1]
        reply = self._replies.get(ident)
        if reply is None:
            return
        if what == worker.PIECE:
            if reply.cancel_event.is_set():  # set by the caller: stop it within a token
                reply.cancel()
            reply.put_piece(event[2], event[3])
        else:
            del self._replies[ident]
            if what == worker.END:
                reply.put_end(event[2], event[3])
            else:
                reply.put_failure(BackendError(f"the reply failed: {event[2]}"))

    def _ended(self) -> str:
        code = self._process.exitcode
        how = "" if code is None else f" (exit code {code})" if code >= 0 else f" (signal {-code})"
        return f"the engine process stopped{how}"


class ProcessChat:
    """One of the engine process's chats."""

    def __init__(self, engine: EngineProcess, info: ChatInfo):
        self._engine = engine
        self._info = info

    @property
    def info(self) -> ChatInfo:
        return self._info

    def reply(
        self,
        messages: Sequence[ChatMessage],
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> ProcessReply:
        messages = [dict(message) for message in messages]
        return self._engine.start(worker.REPLY, self._info.model, messages, cancel, request)

    def complete(
        self,
        prompt: str,
        cancel: threading.Event | None = None,
        request: ReplyRequest | None = None,
    ) -> ProcessReply:
        return self._engine.start(worker.COMPLETE, self._info.model, prompt, cancel, request)

    def context_use(self, messages: Sequence[ChatMessage]) -> ContextUse:
        messages = [dict(message) for message in messages]
        return self._engine.call(self._info.model, "context_use", messages)

    def load(self) -> ChatLoad:
        return self._engine.call(self._info.model, "load")

    def save_context(self, key: str) -> int | None:
        return None  # the server keeps what it computed as long as it can

    def restore_context(self, key: str) -> int:
        return 0

    def close(self) -> None:
        self._engine.close()  # the process's chats go together


class ProcessReply(QueuedReply):
    """A reply written in the engine process; the reading thread puts its pieces."""

    def __init__(self, engine: EngineProcess, ident: int, cancel: threading.Event):
        super().__init__(0, (), cancel)
        self._engine = engine
        self._ident = ident
        self._cancelled = False

    def started(self, prompt_tokens: int, dropped: tuple[int, ...]) -> None:
        self.stats.prompt_tokens = prompt_tokens
        self._dropped = dropped

    def cancel(self) -> None:
        self.cancel_event.set()
        if not self._cancelled:
            self._cancelled = True
            try:
                self._engine.cancel(self._ident)
            except EngineLostError:
                pass  # nothing runs there any more


class _Answer:
    """One message's answer, given by the reading thread: a value, or an error to raise."""

    def __init__(self) -> None:
        self._given = threading.Event()
        self._value: object = None

    def give(self, value: object) -> None:
        self._value = value
        self._given.set()

    def wait(self, timeout: float | None):
        if not self._given.wait(timeout):
            raise BackendError("the engine process did not answer in time")
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value
