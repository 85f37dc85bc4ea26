"""Fine-tuning data: JSON / JSON-lines files -> tokenized examples -> length-bucketed batches.

A file is either a JSON array of objects or JSON lines (one object per line). Each object is

    {"prompt": "...", "response": "..."}          (field names configurable)
    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}

and becomes BlueLM's recipe: `<s> + prompt_ids + response_ids + </s>`, where only the
response and its `</s>` are targets of the loss (the `<s>`, the prompt and the pads are
masked). A prompt is `prompt_template.format(prompt=...)` (the default keeps it as it is;
`"[|Human|]:{prompt}[|AI|]:"` gives the chat format). A message list goes through the chat
template (tokenizer.format_chat) and every assistant answer (with its `</s>`) is a target.

Batches are bucketed by length: a shuffled epoch is cut into windows, each window sorted by
length and split into batches, and every batch is padded on the right to the smallest
bucket width that holds it (16, 32, 64, ... , seq_len), so that little compute goes to
padding and only a few shapes are ever compiled. The order is a pure function of
(seed, epoch), so a data position (epoch, batch index) is all a resumed run needs.

Bad data (missing fields, an empty file, a line that is not JSON, a sample longer than
seq_len) raises DataError with one line naming the file and line, or, with
`skip_bad=True`, is skipped and counted in `Dataset.skipped`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from bluelm_jax.tokenizer import AI, FUNCTION, HUMAN, SYSTEM, format_chat

MIN_BUCKET = 16
SORT_WINDOW = 64  # batches per sorting window: larger = less padding, less randomness


class DataError(ValueError):
    """Unusable training data; the message is one line naming the file (and line)."""


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """How records of a data file are read."""

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    prompt_template: str = "{prompt}"  # e.g. "[|Human|]:{prompt}[|AI|]:" for the chat format


class Example(NamedTuple):
    tokens: np.ndarray  # [n] int32: <s> ... </s>
    is_target: np.ndarray  # [n] bool: token i is a target of the loss (predicted from token i-1)
    source: str  # "file:line"


class Dataset(NamedTuple):
    examples: list  # [Example]
    skipped: list  # ["file:line: reason"] of the records skipped with skip_bad
    path: str

    @property
    def num_target_tokens(self) -> int:
        return int(sum(e.is_target.sum() for e in self.examples))


class Batch(NamedTuple):
    inputs: np.ndarray  # [batch, width] int32, right-padded with pad_id
    targets: np.ndarray  # [batch, width] int32: the token that follows each input
    weights: np.ndarray  # [batch, width] float32: 1 where the target counts in the loss


# ------------------------------------------------------------------ reading records


def check_data_file(path: str) -> None:
    """DataError unless `path` may hold records: an existing, non-empty regular file (or a pipe)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path}: is a directory, expected a JSON or JSON-lines file")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        kind = "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket"
        raise DataError(f"{path}: not a regular file but {kind}, so it holds no training records "
                        f"(expected a JSON or JSON-lines file)")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise DataError(f"{path}: empty file (expected JSON lines or a JSON array of records)")


def read_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) of every record; DataError on a file that cannot hold
    records (see check_data_file) or unreadable JSON.

    A file whose first character (after whitespace) is "[" is one JSON array (its items
    are numbered by the line they start on); otherwise it is JSON lines (blank lines ignored).
    """
    check_data_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSON or JSON-lines file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file (expected JSON lines or a JSON array of records)")
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")


def _array_records(path: str, text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    at = text.index("[") + 1

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    at = skip_ws(at)
    if at < len(text) and text[at] == "]":
        raise DataError(f"{path}: empty JSON array (no records)")
    while True:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:  # the array cannot be read past here
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield line_of(at), value
        at = skip_ws(end)
        if at < len(text) and text[at] == ",":
            at = skip_ws(at + 1)
        elif at < len(text) and text[at] == "]":
            if text[at + 1:].strip():
                raise DataError(f"{path}:{line_of(at + 1)}: unexpected text after the JSON array")
            return
        else:
            raise DataError(f"{path}:{line_of(at)}: not valid JSON (expected ',' or ']' in the array)")


# ------------------------------------------------------------------ tokenizing


def _segments(record: Any, fmt: DataFormat) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a record, in order; ValueError with the reason when unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt.messages_field in record:
        messages = record[fmt.messages_field]
        format_chat(messages)  # validates roles and order; raises ValueError
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{fmt.messages_field!r} must end with an assistant message")
        out = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                out.append((SYSTEM + content, False))
            elif role == "user":
                out.append((HUMAN + content + AI, False))
            elif role == "assistant":
                out.append((content + "</s>", True))
            else:  # function / tool / observation
                out.append((FUNCTION + content + AI, False))
        return out
    for field in (fmt.prompt_field, fmt.response_field):
        if field not in record:
            raise ValueError(f"missing field {field!r} (expected {fmt.prompt_field!r} and {fmt.response_field!r}, "
                             f"or {fmt.messages_field!r})")
        if not isinstance(record[field], str):
            raise ValueError(f"field {field!r} must be a string, got {type(record[field]).__name__}")
    if not record[fmt.response_field]:
        raise ValueError(f"field {fmt.response_field!r} is empty")
    return [(fmt.prompt_template.format(prompt=record[fmt.prompt_field]), False),
            (record[fmt.response_field], True)]


def encode_record(record: Any, tokenizer, fmt: DataFormat = DataFormat(), source: str = "") -> Example:
    """The Example of one record: <s> + prompt + response + </s>; ValueError if unusable."""
    tokens, target = [tokenizer.bos_id], [False]
    segments = _segments(record, fmt)
    for text, is_target in segments:
        ids = tokenizer.encode(text, add_bos=False)
        tokens += ids
        target += [is_target] * len(ids)
    if not segments[-1][0].endswith("</s>"):
        tokens.append(tokenizer.eos_id)
        target.append(True)
    if not any(target):
        raise ValueError("the response has no tokens")
    return Example(np.asarray(tokens, np.int32), np.asarray(target, bool), source)


def load_dataset(path: str | os.PathLike, tokenizer, seq_len: int, fmt: DataFormat = DataFormat(),
                 skip_bad: bool = False) -> Dataset:
    """Every record of `path` tokenized; DataError (one line, naming file and line) on bad data.

    With skip_bad, bad records are skipped and their reasons listed in `Dataset.skipped`; a
    file with no usable record is an error either way. A sample fits if its tokens, <s> and
    </s> included, are at most seq_len.
    """
    path = os.fspath(path)
    examples, skipped = [], []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        try:
            if isinstance(record, DataError):
                raise record
            try:
                ex = encode_record(record, tokenizer, fmt, where)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            if len(ex.tokens) > seq_len:
                raise DataError(f"{where}: sample has {len(ex.tokens)} tokens, longer than seq_len {seq_len}")
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no usable records ({len(skipped)} skipped)" if skipped else f"{path}: no records")
    return Dataset(examples, skipped, path)


# ------------------------------------------------------------------ batching


def bucket_width(n: int, seq_len: int) -> int:
    """Smallest of 16, 32, 64, ... (capped at seq_len) that is >= n."""
    width = MIN_BUCKET
    while width < n:
        width *= 2
    return min(width, seq_len)


def make_batch(examples: list, batch_size: int, seq_len: int, pad_id: int) -> Batch:
    """Right-padded arrays of `examples` (rows beyond them are all padding, weight 0)."""
    width = bucket_width(max(len(e.tokens) - 1 for e in examples), seq_len)
    inputs = np.full((batch_size, width), pad_id, np.int32)
    targets = np.full((batch_size, width), pad_id, np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[row, :n] = e.tokens[:-1]
        targets[row, :n] = e.tokens[1:]
        weights[row, :n] = e.is_target[1:]
    return Batch(inputs, targets, weights)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of one epoch: shuffled, then length-sorted within windows."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * SORT_WINDOW
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a batch stream stands: the next batch is batch `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0


def batches(dataset: Dataset, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
            start: Position = Position(), epochs: Optional[int] = None) -> Iterator[tuple[Position, Batch]]:
    """Endless (or `epochs`-long) stream of (position after this batch, batch) from `start`."""
    lengths = [len(e.tokens) for e in dataset.examples]
    epoch, index = start.epoch, start.index
    while epochs is None or epoch < epochs:
        order = epoch_order(lengths, batch_size, seed, epoch)
        for i in range(index, len(order)):
            after = Position(epoch, i + 1) if i + 1 < len(order) else Position(epoch + 1, 0)
            yield after, make_batch([dataset.examples[j] for j in order[i]], batch_size, seq_len, pad_id)
        epoch, index = epoch + 1, 0


def eval_batches(dataset: Dataset, batch_size: int, seq_len: int, pad_id: int) -> list[Batch]:
    """The whole dataset once, length-sorted (least padding), in fixed order."""
    order = sorted(range(len(dataset.examples)), key=lambda i: len(dataset.examples[i].tokens))
    return [make_batch([dataset.examples[j] for j in order[b:b + batch_size]], batch_size, seq_len, pad_id)
            for b in range(0, len(order), batch_size)]
