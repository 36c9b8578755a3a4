"""The engine process's side of process.py: it opens the chats, starts the replies asked for,
and sends their pieces back, everything that came since its last message in one (a batch step
readies every running reply at once).

Its main thread receives; requests start on a few threads of their own (a one-session chat's
`reply` waits for the reply before it); one thread sends. The scheduler's thread, which runs
the model, thus shares Python's lock only with threads that hold it briefly, not with a server.
"""

from __future__ import annotations

import pickle
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from ..models.store import ModelStore
from .base import BackendError, Chat, ChatSpec, Reply
from .local import LocalBackend

# Messages, as tuples whose first item is one of these.
READY = "ready"  # {name: ChatInfo}: the chats are open
FAILED = "failed"  # the error that kept them from opening
REPLY = "reply"  # id, model, messages, ReplyRequest
COMPLETE = "complete"  # id, model, prompt, ReplyRequest
CANCEL = "cancel"  # id
CALL = "call"  # id, model, method name, args: a quick question (load, context_use)
CLOSE = "close"
STARTED = "started"  # id, prompt tokens, dropped
REFUSED = "refused"  # id, the error
ANSWER = "answer"  # id, the value or the error
EVENTS = "events"  # [(id, PIECE | END | FAILURE, ...)]
PIECE, END, FAILURE = 0, 1, 2  # (text, logprobs) | (ReplyStats, logprobs) | message
CALLS = ("load", "context_use")
STARTERS = 8  # requests started at once
# How long a thread holding Python's lock keeps it from one that waits (the default is 5 ms).
# The scheduler's thread launches a GPU step as hundreds of operations, each of which lets the
# lock go and takes it again: while requests were being started (templated, tokenized) each
# retake waited for a starter's turn, and a mixed step's launch took 60 ms instead of 20.
SWITCH_INTERVAL_S = 0.0005


def main(conn: Connection, models: str, specs: list[ChatSpec]) -> None:
    """The engine process: open `specs` from the store at `models`, then serve `conn` until it
    says close or its other end goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the server's to handle
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    chats: dict[str, Chat] = {}
    try:
        backend = LocalBackend(ModelStore(Path(models)))
        for spec in specs:
            chats[spec.model] = backend.open_chat(spec)
    except BaseException as error:  # noqa: BLE001 - said to the server, which says it in one line
        conn.send((FAILED, _sendable(error)))
        return
    conn.send((READY, {name: chat.info for name, chat in chats.items()}))
    _Worker(conn, chats).run()


@dataclass
class _Running:
    """A reply being sent back: stepped by the sending thread (a watched reply) or by a thread
    of its own (_iterate), never by both."""

    reply: Reply
    pieces: Iterator[str]
    sent: int = 0  # of the reply's logprobs


class _Worker:
    def __init__(self, conn: Connection, chats: dict[str, Chat]):
        self.conn = conn
        self.chats = chats
        self.running: dict[int, _Running] = {}
        self._sending = threading.Lock()
        self._due: list[int | None] = []  # replies with a step ready; None: stop sending
        self._wake = threading.Condition()
        self._starters = ThreadPoolExecutor(STARTERS, thread_name_prefix="llamachat-start")

    def run(self) -> None:
        sender = threading.Thread(target=self._send_due, name="llamachat-send", daemon=True)
        sender.start()
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    break  # the server is gone
                if message[0] == CLOSE:
                    break
                self._handle(message)
        finally:
            for running in list(self.running.values()):
                running.reply.cancel()
            self._starters.shutdown(wait=False, cancel_futures=True)
            with self._wake:
                self._due.append(None)
                self._wake.notify()
            sender.join(timeout=5)
            for chat in self.chats.values():
                chat.close()

    def _handle(self, message: tuple) -> None:
        kind, ident = message[0], message[1]
        if kind in (REPLY, COMPLETE):
            self._starters.submit(self._start, *message)
        elif kind == CANCEL:  # only a started reply is cancelled: it is running, or has ended
            if (running := self.running.get(ident)) is not None:
                running.reply.cancel()
        elif kind == CALL:
            _, _, model, method, args = message
            try:
                if method not in CALLS:
                    raise BackendError(f"no call {method!r} in the engine process")
                value = getattr(self.chats[model], method)(*args)
            except BaseException as error:  # noqa: BLE001 - the asker gets it
                value = _sendable(error)
            self._send((ANSWER, ident, value))

    def _start(self, kind: str, ident: int, model: str, what, request) -> None:
        chat = self.chats[model]
        try:
            start = chat.reply if kind == REPLY else chat.complete
            reply = start(what, cancel=None, request=request)
        except BaseException as error:  # noqa: BLE001 - the request's error, the asker's
            self._send((REFUSED, ident, _sendable(error)))
            return
        self.running[ident] = _Running(reply, iter(reply))
        self._send((STARTED, ident, reply.prompt_tokens, reply.dropped))
        if not reply.watch(lambda: self._ready(ident)):
            self._starters.submit(self._iterate, ident)

    def _ready(self, ident: int) -> None:
        """A reply's next step is there (on the thread that put it)."""
        with self._wake:
            self._due.append(ident)
            if len(self._due) == 1:
                self._wake.notify()

    def _iterate(self, ident: int) -> None:
        """A reply that cannot be watched: every step, waited for on this thread."""
        while ident in self.running:
            event = self._step(ident)
            self._send((EVENTS, [event]))

    def _send_due(self) -> None:
        while True:
            with self._wake:
                while not self._due:
                    self._wake.wait()
                due, self._due = self._due, []
            events = [self._step(ident) for ident in due if ident is not None]
            if events:
                self._send((EVENTS, events))
            if None in due:
                return

    def _step(self, ident: int) -> tuple:
        """The next step of a reply's iteration, as an event; it leaves `running` at its end."""
        running = self.running[ident]
        try:
            text = next(running.pieces)
        except StopIteration:
            del self.running[ident]
            return (ident, END, running.reply.stats, self._logprobs(running))
        except Exception as error:  # noqa: BLE001
            del self.running[ident]
            return (ident, FAILURE, str(error))
        return (ident, PIECE, text, self._logprobs(running))

    @staticmethod
    def _logprobs(running: _Running) -> list:
        given = running.reply.logprobs[running.sent :]
        running.sent += len(given)
        return given

    def _send(self, message: tuple) -> None:
        with self._sending:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                pass  # the server is gone; the receiver sees it too, and stops


def _sendable(error: BaseException) -> BaseException:
    """`error` if it crosses to the other process intact, else a BackendError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001
        return BackendError(f"{type(error).__name__}: {error}")
    return error
