"""A reply's pieces handed to the event loop through an asyncio queue, read there as they come
(a reply that says when: the batch's) or by a worker thread iterating it (Reply iteration
blocks); and the gate that bounds how many run and wait."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..backends.base import (
    BackendError,
    BackendGoneError,
    Chat,
    PromptTooLongError,
    Reply,
    ReplyStats,
    TokenLogprob,
)
from .errors import ApiError
from .metrics import Metrics

log = logging.getLogger("llamachat.server")


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
    """One reply. `start()` waits until the backend has taken the request (or refused it);
    then `pieces_with_logprobs()` yields its text and `stats` is final at the end. A reply
    that can tell when its next piece is there (Reply.watch: the batch's) is read on the
    event loop as each piece comes; any other is iterated on a worker thread of its own."""

    def __init__(self, start: Callable[[threading.Event], Reply], gate: Gate, chat: Chat):
        self._start = start
        self._gate = gate
        self._chat = chat
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.stats = ReplyStats()
        self._reply: Reply | None = None
        self._pieces: Iterator[str] | None = None  # the watched reply's iteration
        self._sent = 0  # the reply's logprobs handed on so far

    async def start(self) -> None:
        """Raises ApiError (prompt too long, a backend failure); the gate is let go then."""
        started = asyncio.ensure_future(asyncio.to_thread(self._started))
        try:
            reply = await asyncio.shield(started)
        except ApiError:
            self._gate.leave()
            raise
        except asyncio.CancelledError:
            # The request went away while the backend took it: what it took must still end,
            # and only then let the gate go.
            started.add_done_callback(self._abandoned)
            raise
        self._read(reply)

    def _read(self, reply: Reply) -> None:
        """Start reading the reply: on the loop when it can say when, else on a thread."""
        self._reply = reply
        if reply.watch(self._ready):
            self._pieces = iter(reply)
        else:
            threading.Thread(target=self._work, daemon=True, name="llamachat-reply").start()

    def _abandoned(self, started: asyncio.Future) -> None:
        if started.cancelled() or started.exception() is not None:
            self._gate.leave()
            return
        reply = started.result()
        reply.cancel()
        self._read(reply)  # its iteration ends within a token, and lets the gate go

    async def pieces_with_logprobs(self):
        """(text, the TokenLogprobs of its tokens) pairs; the text may be empty at the end.
        Pieces that came while the reader was busy are joined into one: a reader that falls
        behind (a busy server) writes fewer, longer chunks instead of falling further behind."""
        held = None
        while True:
            event, held = held or await self._events.get(), None
            if isinstance(event, _Piece):
                texts, tokens = [event.text], list(event.logprobs)
                while not self._events.empty():
                    following = self._events.get_nowait()
                    if not isinstance(following, _Piece):
                        held = following
                        break
                    texts.append(following.text)
                    tokens.extend(following.logprobs)
                yield "".join(texts), tokens
            elif isinstance(event, _Ended):
                self.stats = event.stats
                return
            else:
                raise event.error

    def _started(self) -> Reply:
        """The backend's reply to the request (on a worker thread: templating and handing the
        prompt over can take a while), or the ApiError that says why not."""
        try:
            reply = self._start(self.cancel)
        except PromptTooLongError as error:
            raise ApiError(400, str(error), "messages", "context_length_exceeded") from None
        except BackendGoneError as error:
            raise ApiError(503, str(error), code="backend_gone") from None
        except (BackendError, ValueError) as error:
            raise ApiError(400, str(error)) from None
        except Exception as error:  # noqa: BLE001 - reported to the client as one line
            raise ApiError(500, f"the backend failed: {type(error).__name__}") from None
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
            raise ApiError(400, message, "messages", "context_length_exceeded")
        return reply

    def _ready(self) -> None:
        """The watched reply's word that its next step is there (from its thread)."""
        _doorbell(self._loop).ring(self._advance)

    def _advance(self) -> None:
        """One step of a watched reply's iteration, which `ready` said will not wait (on the
        event loop)."""
        assert self._pieces is not None and self._reply is not None
        try:
            text = next(self._pieces)
        except StopIteration:
            if piece := self._piece(self._reply, ""):
                self._events.put_nowait(piece)
            self._events.put_nowait(_Ended(self._reply.stats))
            self._gate.leave()
            return
        except Exception as error:  # noqa: BLE001
            self._events.put_nowait(_Failed(_failure(error)))
            self._gate.leave()
            return
        if text:
            self._events.put_nowait(self._piece(self._reply, text))

    def _piece(self, reply: Reply, text: str) -> _Piece | None:
        """`text` with the tokens that came since the last piece; at the end (text "") only if
        some are left, whose text the end released or cut."""
        given = reply.logprobs[self._sent :]
        self._sent += len(given)
        return _Piece(text, given) if text or given else None

    def _post(self, event) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def _work(self) -> None:
        try:
            self._run()
        finally:
            # The slot is free only once the backend is done with the reply, whoever ended it.
            self._loop.call_soon_threadsafe(self._gate.leave)

    def _run(self) -> None:
        reply = self._reply
        assert reply is not None
        try:
            for text in reply:
                if text:
                    self._post(self._piece(reply, text))
            if piece := self._piece(reply, ""):
                self._post(piece)
        except Exception as error:  # noqa: BLE001
            self._post(_Failed(_failure(error)))
            return
        self._post(_Ended(reply.stats))


class _Doorbell:
    """Runs callables on an event loop, asked from other threads, waking the loop once for
    however many come before it gets to them: a batch step readies every running reply at
    once, and one wake-up (a write to the loop's pipe) serves them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._due: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def ring(self, call: Callable[[], None]) -> None:
        with self._lock:
            self._due.append(call)
            if len(self._due) > 1:
                return  # the wake-up already asked for will run this one too
        try:
            self._loop.call_soon_threadsafe(self._answer)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    def _answer(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for call in due:
            try:
                call()
            except Exception:  # noqa: BLE001 - one reply's fault must not strand the others
                log.exception("a reply's step failed")


_doorbells: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Doorbell] = (
    weakref.WeakKeyDictionary()
)
_doorbells_lock = threading.Lock()


def _doorbell(loop: asyncio.AbstractEventLoop) -> _Doorbell:
    """The loop's doorbell (made on first use; ringing it from several threads is safe)."""
    with _doorbells_lock:
        bell = _doorbells.get(loop)
        if bell is None:
            bell = _doorbells[loop] = _Doorbell(loop)
        return bell


def _failure(error: Exception) -> ApiError:
    """A reply that failed midway: a backend's own one line, else what failed by name (the
    traceback stays in the server)."""
    if isinstance(error, BackendError):
        return ApiError(500, str(error))
    return ApiError(500, f"the reply failed: {type(error).__name__}")
