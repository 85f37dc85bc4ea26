"""Text of generated ids as it grows: increments for streaming, stop strings, in linear time.

`Detokenizer.push` adds one id and returns the text that can be shown now. An increment
never ends inside a UTF-8 character (an incomplete byte-fallback sequence decodes to U+FFFD
at the end: it is held back), nor in a tail that could begin a stop string. Stop-id tokens
are left out of the text; when a stop string appears, `ids` and `text` are cut before it.

Each push decodes only the ids since the last settled point, plus a few settled ids before
them as context (SentencePiece drops the leading space of the first piece it decodes, so the
tail is decoded after context and the context's text is cut off). Text is settled once it
has all been shown, so the cost of a push does not grow with the length of the output.
"""

from __future__ import annotations

from typing import Optional, Sequence

CONTEXT_IDS = 4  # settled ids decoded again in front of the tail
SETTLE_AFTER = 8  # tail length (ids) from which shown text is settled


def text_of(tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Decoded text of generated ids without stop-id tokens."""
    return tokenizer.decode([i for i in ids if i not in stop_ids], skip_special_tokens=True)


def find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def cut_at_stop_string(tokenizer, ids: list[int], stop_ids, stop_strings) -> Optional[tuple[list[int], str]]:
    """If the text of ids contains a stop string: (the shortest ids prefix whose text holds it,
    the text before the stop string); else None. Decodes the whole text: call it once, at the end."""
    text = text_of(tokenizer, ids, stop_ids)
    at = find_stop(text, stop_strings)
    if at < 0:
        return None
    n = len(ids)
    while n > 1 and find_stop(text_of(tokenizer, ids[: n - 1], stop_ids), stop_strings) >= 0:
        n -= 1
    return ids[:n], text[:at]


def safe_length(text: str, stop_strings: Sequence[str]) -> int:
    """How much of `text` can be shown: not an unfinished UTF-8 character (decoded as U+FFFD
    at the end), nor a tail that could begin a stop string."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    safe = n
    for s in stop_strings:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k: n] == s[:k]:
                safe = min(safe, n - k)
                break
    return safe


class Detokenizer:
    """Text increments of a growing list of generated ids (see the module docstring)."""

    def __init__(self, tokenizer, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, tuple(stop_ids), tuple(stop_strings)
        self.ids: list[int] = []
        self.stopped = False
        self._settled: list[str] = []  # text of ids[:_base], in pieces (joined only by `text`)
        self._base = 0  # ids before this index are settled
        self._tail = ""  # text of ids[_base:]
        self._shown = 0  # characters of the tail already returned

    @property
    def text(self) -> str:
        """The text so far (without stop tokens; cut before a stop string once one appeared)."""
        return "".join(self._settled) + self._tail

    def push(self, token: int, final: bool = False) -> str:
        """Adds one token; returns the text that can be shown now ("" if none).
        final: no more tokens follow, so everything left is returned."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self._tail = self._decode_tail()
        if find_stop(self._tail, self.stop_strings) >= 0:  # settled text never holds the start of one
            found = cut_at_stop_string(self.tokenizer, self.ids, self.stop_ids, self.stop_strings)
            if found is not None:
                self.ids, text = found
                self._tail = text[sum(map(len, self._settled)):]
                self.stopped = final = True
        safe = len(self._tail) if final else safe_length(self._tail, self.stop_strings)
        piece = self._tail[self._shown:safe] if safe > self._shown else ""
        self._shown = max(self._shown, safe)
        if self._shown == len(self._tail) and len(self.ids) - self._base >= SETTLE_AFTER:
            self._settled.append(self._tail)
            self._base, self._tail, self._shown = len(self.ids), "", 0
        return piece

    def _decode_tail(self) -> str:
        """Text of ids[_base:], decoded after up to CONTEXT_IDS settled ids."""
        ctx = max(0, self._base - CONTEXT_IDS)
        head = text_of(self.tokenizer, self.ids[ctx:self._base], self.stop_ids)
        whole = text_of(self.tokenizer, self.ids[ctx:], self.stop_ids)
        if self._base == 0 or (head and whole.startswith(head)):
            return whole[len(head):]
        # the context decodes to nothing (skipped special tokens) or differently: decode it all
        full = text_of(self.tokenizer, self.ids, self.stop_ids)
        return full[sum(map(len, self._settled)):]
