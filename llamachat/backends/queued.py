"""A reply whose pieces another thread hands over through a queue: the batch scheduler's thread
(batched.py) or the thread reading an engine process's messages (process.py). Its reader
iterates it, blocking, or watches it and takes each step when told that it will not wait."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from .base import BackendError, ReplyStats, TokenLogprob

_END = object()  # what the queue holds after the last piece


class QueuedReply:
    def __init__(self, prompt_tokens: int, dropped: tuple[int, ...], cancel: threading.Event):
        self.cancel_event = cancel
        # (text, the TokenLogprobs it came with), an error, or _END.
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._dropped = dropped
        self._stats = ReplyStats(prompt_tokens=prompt_tokens)
        self._rest: list[TokenLogprob] = []  # the tokens no text came with, at the end
        self.logprobs: list[TokenLogprob] = []  # extended by the iteration, with their text
        self._consumed = False
        self._ready: Callable[[], None] | None = None  # watch()'s, told of each item put
        self._putting = threading.Lock()

    @property
    def dropped(self) -> tuple[int, ...]:
        return self._dropped

    @property
    def prompt_tokens(self) -> int:
        return self._stats.prompt_tokens

    @property
    def stats(self) -> ReplyStats:
        return self._stats

    def put_piece(self, text: str, tokens: list[TokenLogprob]) -> None:
        self._put((text, tokens))

    def put_end(self, stats: ReplyStats, rest: list[TokenLogprob]) -> None:
        """The reply is over: its final stats, and the tokens that came with no piece."""
        self._stats = stats
        self._rest = rest
        self._put(_END)

    def put_failure(self, error: BaseException) -> None:
        self._put(error)

    def _put(self, item: object) -> None:
        with self._putting:
            self._queue.put(item)
            ready = self._ready
        if ready is not None:
            ready()

    def watch(self, ready: Callable[[], None]) -> bool:
        """Each item of the queue is one step of the iteration: `ready` is called once per
        item, those already there included."""
        with self._putting:
            self._ready = ready
            queued = self._queue.qsize()
        for _ in range(queued):
            ready()
        return True

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise RuntimeError("a reply can be streamed only once")
        self._consumed = True
        finished = False
        try:
            while (item := self._queue.get()) is not _END:
                if isinstance(item, BaseException):
                    finished = True
                    if isinstance(item, BackendError):
                        raise item
                    raise BackendError(f"the reply failed: {item}") from item
                assert isinstance(item, tuple)
                text, tokens = item
                self.logprobs.extend(tokens)
                yield text
            self.logprobs.extend(self._rest)
            finished = True
        finally:
            if not finished:  # the reader stopped early: the reply is not wanted any more
                self.cancel()

    def cancel(self) -> None:
        self.cancel_event.set()
