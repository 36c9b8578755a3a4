"""Streaming text out of token ids: never half a UTF-8 character, never part of a stop string."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feeds token ids in, takes text pieces out.

    A byte-level tokenizer splits a Chinese character or an emoji across several tokens; decoding
    such a prefix gives U+FFFD, so text is held until the character is whole. Each step decodes
    only a short window (the previous piece's tokens onward), so the cost per token stays flat.

    Text that could be the start of a stop string is held back until it either completes the stop
    string (then it, and everything after, is dropped) or stops matching (then it is released).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self._decode = decode
        self._stops = tuple(s for s in stop_strings if s)
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are fully emitted
        self._read = 0  # tokens before it have been turned into text
        self._held = ""  # decoded text not yet released (a possible stop-string start)
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string was found; push() returns "" from now on

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        new_text = self._new_text(final=False)
        return self._release(new_text, final=False)

    def finish(self) -> str:
        """Release whatever is left: the end of the reply, or the point it was cut off. A
        character left unfinished there is dropped, not shown as U+FFFD (as llama.cpp's server
        and vLLM do); its tokens stay in the reply's ids."""
        if self.stopped:
            return ""
        return self._release(self._new_text(final=True), final=True)

    def _new_text(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        known = self._decode(self._ids[self._prefix : self._read])
        current = self._decode(self._ids[self._prefix :])
        if not final and (len(current) <= len(known) or current.endswith(REPLACEMENT)):
            return ""  # an unfinished character (or nothing visible yet): wait for more tokens
        if final:
            # The bytes decoded here cannot tell a U+FFFD the reply spelled out whole at its very
            # end from an unfinished character; the second is what a cut-off leaves.
            current = current.rstrip(REPLACEMENT)
        self._prefix, self._read = self._read, len(self._ids)
        return current[len(known) :]

    def _release(self, new_text: str, final: bool) -> str:
        pending = self._held + new_text
        cut = _first_stop(pending, self._stops)
        if cut is not None:
            pending, self.stopped = pending[:cut], True
            held = ""
        elif final:
            held = ""
        else:
            keep = _partial_stop_length(pending, self._stops)
            pending, held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._held = held
        self.text += pending
        return pending


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(found) if found else None


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
