"""A reply iterated on its own worker thread (Reply iteration blocks), its pieces handed to the
event loop through an asyncio queue; and the gate that bounds how many run and wait."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..backends.base import (
    BackendError,
    Chat,
    PromptTooLongError,
    Reply,
    ReplyStats,
    TokenLogprob,
)
from .errors import ApiError
from .metrics import Metrics


@dataclass
class _Started:
    reply: Reply


@dataclass
class _Piece:
    text: str
    logprobs: list[TokenLogprob]  # the tokens since the last piece, when asked for


@dataclass
class _Ended:
    stats: ReplyStats


@dataclass
class _Failed:
    error: ApiError


class Gate:
    """At most `running` replies of one model at a time; up to `queue` more wait their turn,
    and a request beyond that is refused with 503 at once."""

    def __init__(self, model: str, running: int, queue: int, metrics: Metrics):
        self.model = model
        self.slots = asyncio.Semaphore(running)
        self.queue = queue
        self.waiting = 0
        self.metrics = metrics
        metrics.waiting.labels(model).set(0)  # shown as 0 from the start, not absent
        metrics.running.labels(model).set(0)

    async def enter(self) -> None:
        if self.slots.locked() and self.waiting >= self.queue:
            raise ApiError(
                503,
                f"the server is busy ({self.waiting} requests waiting for {self.model}); retry",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        self.metrics.waiting.labels(self.model).inc()
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.labels(self.model).dec()
        self.metrics.running.labels(self.model).inc()

    def leave(self) -> None:
        self.metrics.running.labels(self.model).dec()
        self.slots.release()


class Run:
    """One reply on a worker thread. `start()` waits until the backend has taken the request
    (or refused it); then `pieces_with_logprobs()` yields its text and `stats` is final at the
    end."""

    def __init__(self, start: Callable[[threading.Event], Reply], gate: Gate, chat: Chat):
        self._start = start
        self._gate = gate
        self._chat = chat
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.stats = ReplyStats()
        self._thread = threading.Thread(target=self._work, daemon=True, name="llamachat-reply")

    async def start(self) -> None:
        """Raises ApiError (prompt too long, a backend failure); the gate is let go then."""
        self._thread.start()
        event = await self._events.get()
        if isinstance(event, _Failed):
            raise event.error

    async def pieces_with_logprobs(self):
        """(text, the TokenLogprobs of its tokens) pairs; the text may be empty at the end."""
        while True:
            event = await self._events.get()
            if isinstance(event, _Piece):
                yield event.text, event.logprobs
            elif isinstance(event, _Ended):
                self.stats = event.stats
                return
            else:
                raise event.error

    def _post(self, event) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def _work(self) -> None:
        try:
            self._run()
        finally:
            # The slot is free only once the backend is done with the reply, whoever ended it.
            self._loop.call_soon_threadsafe(self._gate.leave)

    def _run(self) -> None:
        try:
            reply = self._start(self.cancel)
        except PromptTooLongError as error:
            self._post(_Failed(ApiError(400, str(error), "messages", "context_length_exceeded")))
            return
        except (BackendError, ValueError) as error:
            self._post(_Failed(ApiError(400, str(error))))
            return
        except Exception as error:  # noqa: BLE001 - reported to the client as one line
            self._post(_Failed(ApiError(500, f"the backend failed: {type(error).__name__}")))
            return
        if reply.dropped:
            # The backend would drop older turns to fit its window; a client of this API expects
            # its whole conversation read, or an error.
            reply.cancel()
            for _ in reply:
                pass
            window = self._chat.info.context_size
            message = (
                f"the conversation does not fit the context window of {window} tokens"
                f" (with room for the reply); shorten it or serve the model with a larger --ctx"
            )
            self._post(_Failed(ApiError(400, message, "messages", "context_length_exceeded")))
            return
        self._post(_Started(reply))
        sent = 0
        try:
            for text in reply:
                if text:
                    given = reply.logprobs[sent:]
                    sent += len(given)
                    self._post(_Piece(text, given))
            if left := reply.logprobs[sent:]:  # tokens whose text the end released or cut
                self._post(_Piece("", left))
        except Exception as error:  # noqa: BLE001
            self._post(_Failed(ApiError(500, f"the reply failed: {type(error).__name__}")))
            return
        self._post(_Ended(reply.stats))
