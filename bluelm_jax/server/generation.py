"""One choice of a request: the engine's tokens -> text increments, stop strings, finish reason.

A `Choice` wraps an engine `Handle` and a `Detokenizer`. Its text increments never split a
UTF-8 character nor show the start of a stop string; when a stop string appears the engine
is told at once (`handle.stop()`). Leaving the iteration early (a client that went away, a
cancelled task) cancels the request, so its decode slot is freed.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator, Optional, Sequence

from bluelm_jax.detokenizer import Detokenizer


class Choice:
    """The text of one engine request, as it comes."""

    def __init__(self, handle, tokenizer, stop_ids: Sequence[int], stop_strings: Sequence[str]):
        self.handle = handle
        self.detok = Detokenizer(tokenizer, stop_ids, stop_strings)
        self.shown = 0  # characters of the text handed out so far
        self.done_at: Optional[float] = None

    async def pieces(self) -> AsyncIterator[str]:
        """Text increments until the request ends; their concatenation is `text`."""
        try:
            async with contextlib.aclosing(self.handle.atokens()) as tokens:
                async for token in tokens:
                    piece = self.detok.push(token)
                    if self.detok.stopped:
                        self.handle.stop()
                    if piece:
                        self.shown += len(piece)
                        yield piece
                    if self.detok.stopped:
                        break
            rest = self.detok.text[self.shown:]  # held back in case a stop string followed
            if rest:
                self.shown += len(rest)
                yield rest
        finally:
            self.done_at = time.perf_counter()
            self.cancel()

    async def collect(self) -> str:
        """The whole text."""
        async for _ in self.pieces():
            pass
        return self.text

    def cancel(self) -> None:
        """Frees the request's slot (the client went away); nothing once it ended or stopped."""
        if not self.detok.stopped and self.handle.finish_reason is None:
            self.handle.cancel()

    @property
    def text(self) -> str:
        """The text so far (without stop tokens, cut before a stop string)."""
        return self.detok.text

    @property
    def finish_reason(self) -> str:
        """"stop" (a stop token or string) or "length" (max_tokens or the context's end)."""
        if self.detok.stopped:
            return "stop"
        return self.handle.finish_reason or "stop"

    @property
    def completion_ids(self) -> list[int]:
        """The generated ids (with the stop token; cut after a stop string)."""
        return self.detok.ids

    def latencies(self) -> tuple[Optional[float], Optional[float]]:
        """(time to first token, time per output token after the first); None where unknown."""
        h = self.handle
        if h.first_token_at is None:
            return None, None
        end = h.finished_at if h.finished_at is not None else self.done_at
        n = len(self.detok.ids)
        tpot = (end - h.first_token_at) / (n - 1) if end is not None and n > 1 else None
        return h.first_token_at - h.submitted_at, tpot
