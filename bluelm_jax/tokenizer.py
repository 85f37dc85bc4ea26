"""BlueLM tokenizer: SentencePiece ids <-> text, special-token splitting, chat template, stop ids.

Reproduces BlueLM's "slow" (LlamaTokenizer-style, legacy mode) Hugging Face tokenizer on top of
the `sentencepiece` package alone:

* Encoding first splits the text on the special tokens (the unk/bos/eos/pad pieces) and the chat
  markers `[|Human|]:` `[|AI|]:` `[|SYSTEM|]:` `[|Function|]:` (those present in the model), longest
  match first. Each special maps to its id; every plain segment is encoded on its own with
  `SentencePieceProcessor.encode`, so it gets SentencePiece's dummy prefix "▁" even right after a
  special token (`[|Human|]:hi` -> `[id([|Human|]:)] + sp.encode("hi")`, i.e. "▁hi"). Whitespace
  around special tokens is kept, never stripped. `<s>` is prepended when `add_bos`.
  Verified against transformers 5.24's slow `SentencePieceBackend` (legacy=True, the chat markers
  as additional special tokens, which are AddedTokens with lstrip=rstrip=False): its `tokenize`
  splits on the trie of added tokens and calls `sp_model.encode` per segment, giving the same ids
  (pinned in tests/test_tokenizer.py). Caveat: transformers 4.33 (BlueLM's release) stripped the
  whitespace on both sides of special tokens that were plain strings rather than AddedTokens;
  BlueLM's chat format never puts whitespace next to a marker, so prompts built by `format_chat`
  are unaffected.
* Splitting happens before SentencePiece: the markers are user-defined pieces, and plain
  `sp.encode` of a whole chat string would differ (it emits a lone "▁" before a leading marker and
  no dummy prefix after one).
* Decoding drops bos/eos/pad/unk when `skip_special_tokens` (the chat markers are always kept);
  otherwise specials appear as their piece text. The runs of ordinary ids between special tokens
  are decoded separately by SentencePiece, so `decode(encode(t), False)` gives back `t` exactly for
  an identity-normalising model. (Hugging Face inserts spaces around special tokens when decoding;
  that quirk is not reproduced.) Ids outside [0, vocab_size) raise ValueError: the embedding has
  more rows than the tokenizer has pieces, and sampling such an id is a bug upstream.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

HUMAN, AI, SYSTEM, FUNCTION = "[|Human|]:", "[|AI|]:", "[|SYSTEM|]:", "[|Function|]:"
CHAT_MARKERS = (HUMAN, AI, SYSTEM, FUNCTION)
CHAT_STOP_STRINGS = (HUMAN,)
EOS_TEXT = "</s>"

_PROMPT_ROLES = {"user": HUMAN, "function": FUNCTION, "tool": FUNCTION, "observation": FUNCTION}
_ROLES = ("system", "user", "assistant", "function")


def format_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """BlueLM chat prompt for `messages` ({"role", "content"} dicts); ValueError on bad input."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("messages is empty")
    parts: list[str] = []
    prev = None  # role of the previous message, aliases folded to "function"
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str):
            raise ValueError(f"message {i}: role must be a string, got {type(role).__name__}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            parts.append(SYSTEM + content)
        elif role in _PROMPT_ROLES:
            if prev in ("user", "function"):
                raise ValueError(f"message {i}: {role!r} follows {prev!r} with no assistant answer between")
            parts.append(_PROMPT_ROLES[role] + content + AI)
        elif role == "assistant":
            if prev not in ("user", "function"):
                raise ValueError(f"message {i}: an assistant message must follow a user or function message")
            parts.append(content + EOS_TEXT)
        else:
            expected = ", ".join(_ROLES)
            raise ValueError(f"message {i}: unknown role {role!r} (expected {expected}, or tool/observation)")
        prev = "function" if role in ("tool", "observation") else role
    if prev == "system":
        raise ValueError("messages has no user or function message")
    return "".join(parts)


class BlueLMTokenizer:
    """SentencePiece tokenizer with BlueLM's special-token handling and chat template."""

    def __init__(self, model_file: str | os.PathLike[str] | None = None, *, model_proto: bytes | None = None):
        """Loads a `tokenizer.model` from a path, or from its serialized bytes via `model_proto`."""
        if (model_file is None) == (model_proto is None):
            raise ValueError("give exactly one of model_file or model_proto")
        if model_file is not None:
            with open(model_file, "rb") as f:
                model_proto = f.read()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise ValueError(f"not a SentencePiece model ({model_file or 'bytes'}): {e}") from None
        self._proto = bytes(model_proto)
        specials = [self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._pad_id()]
        self._special_ids = frozenset(i for i in specials if i is not None and i >= 0)
        markers = [m for m in CHAT_MARKERS if self._has_piece(m)]
        self._added_ids = frozenset(self._sp.piece_to_id(m) for m in markers)
        self._split_ids = {self._sp.id_to_piece(i): i for i in self._special_ids | self._added_ids}
        alternatives = sorted(self._split_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BlueLMTokenizer:
        """Loads a `tokenizer.model` file."""
        return cls(path)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlueLMTokenizer:
        """Loads a serialized SentencePiece model."""
        return cls(model_proto=data)

    def _has_piece(self, piece: str) -> bool:
        """Whether `piece` is a piece of the model (not mapped to unk)."""
        i = self._sp.piece_to_id(piece)
        return self._sp.id_to_piece(i) == piece

    def _pad_id(self) -> int | None:
        """The model's pad id, else the id of a `<pad>` piece, else None."""
        if self._sp.pad_id() >= 0:
            return self._sp.pad_id()
        return self._sp.piece_to_id("<pad>") if self._has_piece("<pad>") else None

    @property
    def serialized_model(self) -> bytes:
        """The SentencePiece model bytes (what `tokenizer.model` holds)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces; ids at or above this are never valid."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Id of `<s>`."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of `</s>`."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Id of `<unk>`."""
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int | None:
        """Id of the pad piece (None if the model has none)."""
        return self._pad_id()

    @property
    def special_ids(self) -> frozenset[int]:
        """The bos/eos/pad/unk ids (dropped by `decode(..., skip_special_tokens=True)`)."""
        return self._special_ids

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Ids that end a chat reply: `</s>` and the `[|Human|]:` piece (if the model has it)."""
        stops = [self._sp.piece_to_id(s) for s in CHAT_STOP_STRINGS if self._has_piece(s)]
        return (self.eos_id, *stops)

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; KeyError if the model has no such piece."""
        if not self._has_piece(piece):
            raise KeyError(f"no piece {piece!r} in the tokenizer")
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, id: int) -> str:
        """Piece text of `id`; ValueError if out of range."""
        return self._sp.id_to_piece(self._check_id(id))

    def _check_id(self, id: int) -> int:
        """`id` as an int, or ValueError if it is not a valid piece id."""
        i = int(id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the tokenizer's pieces [0, {self.vocab_size})")
        return i

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`: split on special tokens, SentencePiece per segment, `<s>` first if add_bos."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        for k, segment in enumerate(self._split_re.split(text)):
            if k % 2:  # odd positions are the captured special tokens
                ids.append(self._split_ids[segment])
            elif segment:
                ids.extend(self._sp.encode(segment))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bos/eos/pad/unk dropped if skip_special_tokens, else shown as their pieces."""
        parts: list[str] = []
        run: list[int] = []
        for id in ids:
            i = self._check_id(id)
            if i in self._special_ids and skip_special_tokens:
                continue
            if i in self._special_ids or i in self._added_ids:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of `format_chat(messages)`, with `<s>` first."""
        return self.encode(format_chat(messages), add_bos=True)

    def __repr__(self) -> str:
        """Short description."""
        return f"BlueLMTokenizer(vocab_size={self.vocab_size})"
