"""Scoring text: the log-likelihood of continuations and of whole documents (perplexity).

    loglikelihood(model, [(context, continuation), ...])  -> [Score(logprob, is_greedy, tokens)]
    loglikelihood_rolling(model, text, window=None, stride=None) -> RollingScore
    rolling_loglikelihoods(model, [text, ...], ...)        -> [RollingScore] (windows of all batched)

All reduce to `token_logprobs`: for each token sequence, log p(ids[i+1] | ids[:i+1]) and
whether ids[i+1] is the argmax there, for the positions asked for (`scored_from`), from one
causal forward pass in float32 (log-probabilities as logit - logsumexp).

What runs (`shared_inputs`): a row's predictions need only its ids but the last as input, and a
row whose input begins another's is read from that one, at its own positions with its own
targets (a question's one-token options run the question once).

How inputs run (`pack_rows`): inputs of up to PACKED_UP_TO tokens are packed, one after another,
into rows of one width (the longest such row's `score_width`, at least MIN_PACK_WIDTH), best
fit, longest first; each token's position restarts at its own sequence's start and it attends
only within its own sequence (a per-query `start`, attention.py), so a packed row scores
exactly what its sequences would alone, with next to no padding. Longer rows run alone at their
`score_width`, with one attention start a row (so that GPUs and TPUs use their fused kernels).
Rows of one width run in batches of `batch_size`, those that score fewest positions first, a
smaller last batch padded with empty rows to a power of two. The language-model head and the
log-softmax run only at the positions scored (the continuation, for loglikelihood): the batch's
largest count, as `scored_width` pads it, a row, and at most SCORED_CHUNK at a time, so a 32K
window never builds a [32K, vocab] table. A program is compiled per (width, scored width,
batch rows) and reused for every batch of that shape: `TRACE_COUNTS["scoring"]` counts the traces.

Texts are tokenized as lm-evaluation-harness splits them for a causal model with
`add_bos_token=True`: the context with `<s>` in front, and the continuation as the tokens that context + continuation has beyond the
context's own (so a word split across the boundary is scored as the model would read it).
A row longer than `max_length` (default: the model's context) keeps its last `max_length` tokens.

Rolling log-likelihood scores a document in windows of `window` tokens (default: the model's
context) that start every `stride` tokens (default: half a window), so that each window after
the first re-reads `window - stride` tokens as context and scores only the tokens no earlier
window scored; the first token (`<s>`) is never scored. A document that fits one window is
scored exactly as `token_logprobs` of the whole.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
import sys
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax.model import build
from bluelm_jax.planning import bucket_length

TRACE_COUNTS: collections.Counter = collections.Counter()  # "scoring" -> traces of the compiled scorer
WIDTH_QUANTUM = 64  # rows up to FINE_WIDTHS_UP_TO tokens are padded to a multiple of this
FINE_WIDTHS_UP_TO = 1024
PACKED_UP_TO = 1024  # rows of at most this many tokens are packed together (dense attention)
MIN_PACK_WIDTH = 256  # packed rows are at least this wide
SCORED_CHUNK = 512  # the head and log-softmax run on at most this many positions of a row at once
Text = Union[str, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Score:
    """The summed log-probability of a continuation's tokens, and whether greedy decoding would
    have produced every one of them."""

    logprob: float
    is_greedy: bool
    tokens: int


@dataclasses.dataclass(frozen=True)
class RollingScore:
    """A document's summed log-likelihood over its `tokens` scored tokens (all but `<s>`)."""

    logprob: float
    tokens: int

    @property
    def nll_per_token(self) -> float:
        return -self.logprob / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)


@functools.partial(jax.jit, static_argnames=("config", "compute_dtype", "top_k", "pieces"))
def _score_rows(params: dict, tokens: jax.Array, positions: jax.Array, start: jax.Array, at: jax.Array,
                targets: jax.Array, config, compute_dtype, top_k: int = 0,
                pieces: Optional[int] = None) -> tuple[jax.Array, ...]:
    """The scores of (packed) rows at chosen positions.

    tokens, positions: [rows, width] int32; start: [rows, width] int32, the first slot each token
    attends to (packed rows), or [rows] (one sequence a row);
    at, targets: [rows, scored] int32: the positions whose next-token distribution is scored,
    and the token scored there. Returns (log p(target) [rows, scored] float32, target is the
    argmax [rows, scored] bool), and with top_k > 0 the top_k log-probabilities and ids among the
    first `pieces` ids ([rows, scored, top_k] each).
    """
    TRACE_COUNTS["scoring"] += 1
    module = build(config, params, compute_dtype)
    hidden, _ = module.model(tokens, positions, None, start, None, False, "auto")  # [rows, width, hidden]

    def score(at: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:  # at, targets: [rows, chunk]
        x = jnp.take_along_axis(hidden, at[..., None], axis=1)  # [rows, chunk, hidden]
        logits = module.lm_head(x).astype(jnp.float32)  # [rows, chunk, vocab]
        normalizer = jax.nn.logsumexp(logits, axis=-1)  # [rows, chunk]
        chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - normalizer
        found = (chosen, jnp.argmax(logits, axis=-1) == targets)
        if not top_k:
            return found
        top, ids = jax.lax.top_k(logits[..., :pieces], top_k)
        return found + (top - normalizer[..., None], ids)

    rows, scored = at.shape
    if scored <= SCORED_CHUNK:
        return score(at, targets)
    chunks = (x.reshape(rows, scored // SCORED_CHUNK, SCORED_CHUNK).swapaxes(0, 1) for x in (at, targets))
    found = jax.lax.map(lambda args: score(*args), tuple(chunks))  # each [chunks, rows, SCORED_CHUNK, ...]
    return tuple(x.swapaxes(0, 1).reshape(rows, scored, *x.shape[3:]) for x in found)


def score_width(n: int) -> int:
    """The padded length a row of n tokens is scored at: a multiple of WIDTH_QUANTUM up to
    FINE_WIDTHS_UP_TO (short rows, where the quantum wastes little and there are few widths),
    the prompt bucket (a power of two) beyond."""
    if n <= FINE_WIDTHS_UP_TO:
        return -(-n // WIDTH_QUANTUM) * WIDTH_QUANTUM
    return bucket_length(n)


def scored_width(n: int) -> int:
    """The padded number of scored positions of a row that scores n: a power of two (at least 8)
    up to SCORED_CHUNK, a multiple of it beyond."""
    if n <= SCORED_CHUNK:
        return max(8, 1 << (n - 1).bit_length())
    return -(-n // SCORED_CHUNK) * SCORED_CHUNK


def pack_rows(lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(width, the indices of the rows it holds, in order) for each row run: rows of up to
    PACKED_UP_TO tokens packed into rows of one width by best fit, longest first; longer rows
    alone at their score_width (module docstring)."""
    short = sorted((i for i, n in enumerate(lengths) if n <= PACKED_UP_TO), key=lambda i: -lengths[i])
    runs = [(score_width(lengths[i]), [i]) for i, n in enumerate(lengths) if n > PACKED_UP_TO]
    if not short:
        return runs
    width = max(MIN_PACK_WIDTH, score_width(lengths[short[0]]))
    packed: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, packed row), sorted
    for i in short:
        at = bisect.bisect_left(room, (lengths[i], -1))  # the fullest row it fits in
        if at == len(room):
            packed.append([i])
            free, row = width - lengths[i], len(packed) - 1
        else:
            free, row = room.pop(at)
            packed[row].append(i)
            free -= lengths[i]
        bisect.insort(room, (free, row))
    return [(width, members) for members in packed] + runs


def shared_inputs(rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(the token sequences to run, the rows read from each). A row's predictions need only its
    ids[:-1] as input; a row whose ids[:-1] begins another's input is read from that input, at its
    own positions with its own targets (the options of a multiple-choice question with a one-token
    answer share one input: the question)."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i][:-1]))  # a prefix sorts just before its extensions
    owner = [0] * len(rows)
    inputs: list[list[int]] = []
    readers: list[list[int]] = []
    for at in reversed(range(len(order))):
        i, prefix = order[at], list(rows[order[at]][:-1])
        later = order[at + 1] if at + 1 < len(order) else None
        if later is not None and list(rows[later][:len(prefix)]) == prefix and len(rows[later]) > len(prefix):
            owner[i] = owner[later]  # the input `later` is read from extends this row's
        else:
            owner[i] = len(inputs)
            inputs.append(prefix)
            readers.append([])
        readers[owner[i]].append(i)
    return inputs, readers


def token_logprobs(model, rows: Sequence[Sequence[int]], batch_size: int = 8, progress: bool = False,
                   scored_from: Optional[Sequence[int]] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each id sequence (at least 2 ids, at most the model's context): (log p(ids[i+1] | ids[:i+1]),
    is ids[i+1] the argmax), float32 and bool arrays over the ids from scored_from[row] on (default 1:
    all but the first, n - 1 entries). Rows share inputs (`shared_inputs`) and run packed, in batches
    of `batch_size` (module docstring); `progress` shows a bar of the tokens scored (stderr)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = model.config.context_length
    scored_from = [1] * len(rows) if scored_from is None else list(scored_from)
    for i, row in enumerate(rows):
        if not 2 <= len(row) <= limit:
            raise ValueError(f"row {i} has {len(row)} tokens: scoring needs 2 to {limit} (the model's context)")
        if not 1 <= scored_from[i] < len(row):
            raise ValueError(f"row {i}: scoring from token {scored_from[i]} of {len(row)}")
    inputs, readers = shared_inputs(rows)
    runs = pack_rows([len(ids) for ids in inputs])
    scored = [sum(len(rows[i]) - scored_from[i] for k in members for i in readers[k]) for _, members in runs]
    by_width: dict[int, list[int]] = collections.defaultdict(list)  # width -> runs, fewest scored first
    for r in sorted(range(len(runs)), key=lambda r: scored[r]):
        by_width[runs[r][0]].append(r)
    found: list = [None] * len(rows)
    from tqdm import tqdm

    bar = tqdm(total=sum(scored), unit="tok", desc="scoring", disable=not progress, file=sys.stderr)
    for width, members in sorted(by_width.items()):
        packed = any(len(runs[r][1]) > 1 for r in members)  # else one start a row (_batch_arrays)
        for at in range(0, len(members), batch_size):
            chunk = members[at:at + batch_size]
            batch = [[(inputs[k], [(rows[i], scored_from[i]) for i in readers[k]]) for k in runs[r][1]] for r in chunk]
            scored_positions = scored_width(max(scored[r] for r in chunk))
            arrays = _batch_arrays(batch, width, scored_positions, batch_size, model.config.pad_token_id, packed)
            chosen, greedy = jax.device_get(_score_rows(model.params, *map(jnp.asarray, arrays), model.config,
                                                        jnp.dtype(model.compute_dtype)))
            for r, run in enumerate(chunk):
                filled = 0
                for i in (i for k in runs[run][1] for i in readers[k]):  # the order _batch_arrays fills
                    n = len(rows[i]) - scored_from[i]
                    found[i] = (chosen[r, filled:filled + n], greedy[r, filled:filled + n])
                    filled += n
                bar.update(filled)
    bar.close()
    return found


def _batch_arrays(batch: list, width: int, scored_positions: int, batch_size: int, pad: int,
                  per_query_start: bool = True) -> tuple[np.ndarray, ...]:
    """The inputs of _score_rows for a batch of packed rows, each a list of (input ids, [(row,
    scored_from) read from it]), padded with empty rows to a power of two (or batch_size): tokens,
    positions [n, width], start [n, width] (or [n] without per_query_start: rows that hold one
    input each), at, targets [n, scored_positions]. Padding tokens attend only to themselves (or,
    with a start a row, to the row before them); padding positions score id 0."""
    n = min(batch_size, 1 << (len(batch) - 1).bit_length())
    tokens = np.full((n, width), pad, np.int32)
    positions = np.zeros((n, width), np.int32)
    start = np.broadcast_to(np.arange(width, dtype=np.int32), (n, width)).copy()
    at = np.zeros((n, scored_positions), np.int32)
    targets = np.zeros((n, scored_positions), np.int32)
    for r, packed in enumerate(batch):
        offset, filled = 0, 0
        for ids, reading in packed:
            tokens[r, offset:offset + len(ids)] = ids
            positions[r, offset:offset + len(ids)] = np.arange(len(ids))
            start[r, offset:offset + len(ids)] = offset
            for row, first in reading:
                count = len(row) - first
                at[r, filled:filled + count] = np.arange(offset + first - 1, offset + len(row) - 1)
                targets[r, filled:filled + count] = row[first:]
                filled += count
            offset += len(ids)
    if not per_query_start:  # one start a row, which the platform kernels take (right padding is never scored)
        start = np.zeros((n,), np.int32)
    return tokens, positions, start, at, targets


@dataclasses.dataclass
class TokenScores:
    """One sequence's scores: token_logprobs[i] = log p(ids[i+1] | ids[:i+1]); top_ids / top_logprobs[i]:
    the k most likely ids there and their log-probabilities."""

    token_logprobs: np.ndarray  # [n - 1] float32
    top_ids: np.ndarray  # [n - 1, k] int32
    top_logprobs: np.ndarray  # [n - 1, k] float32


def top_logprobs(model, ids: Sequence[int], k: int) -> TokenScores:
    """The scores of one sequence (2 ids or more) with the k most likely alternatives at each position
    among the tokenizer's pieces (the embedding may have more rows than the tokenizer has pieces;
    those ids have no text). What /v1/completions answers `logprobs` with."""
    n = len(ids)
    if not 2 <= n <= model.config.context_length:
        raise ValueError(f"a sequence of {n} tokens: scoring needs 2 to {model.config.context_length}")
    arrays = _batch_arrays([[(list(ids[:-1]), [(list(ids), 1)])]], score_width(n - 1), scored_width(n - 1), 1,
                           model.config.pad_token_id, per_query_start=False)
    pieces = min(model.config.vocab_size, model.tokenizer.vocab_size)
    chosen, _, top_lp, top_ids = jax.device_get(_score_rows(model.params, *map(jnp.asarray, arrays), model.config,
                                                            jnp.dtype(model.compute_dtype), max(k, 1), pieces))
    return TokenScores(chosen[0, :n - 1], top_ids[0, :n - 1, :k], top_lp[0, :n - 1, :k])


def encode_pair(model, context: Text, continuation: Text) -> tuple[list[int], list[int]]:
    """(context ids with `<s>` first, continuation ids) of two texts, as the module docstring says;
    two id lists are taken as they are."""
    if not isinstance(context, str) and not isinstance(continuation, str):
        return list(context), list(continuation)
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise ValueError("a context and its continuation must both be texts or both be token ids")
    context_ids = model.tokenizer.encode(context, add_bos=True)
    whole = model.tokenizer.encode(context + continuation, add_bos=True)
    if whole[:len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids):]
    return context_ids, model.tokenizer.encode(continuation, add_bos=False)  # the boundary merged: score it alone


def loglikelihood(model, requests: Sequence[tuple[Text, Text]], batch_size: int = 8,
                  max_length: Optional[int] = None) -> list[Score]:
    """The log-likelihood of each continuation after its context (texts or id lists), in order; a
    pair longer than max_length (default: the model's context) keeps its last max_length tokens."""
    limit = model.config.context_length if max_length is None else max_length
    if not 2 <= limit <= model.config.context_length:
        raise ValueError(f"max_length must be in [2, {model.config.context_length}], got {max_length}")
    rows, lengths = [], []
    for i, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(model, context, continuation)
        if not continuation_ids:
            raise ValueError(f"request {i}: the continuation has no tokens")
        if not context_ids:
            raise ValueError(f"request {i}: the context has no tokens (give at least <s>)")
        row = (context_ids + continuation_ids)[-limit:]
        if len(continuation_ids) >= len(row):
            raise ValueError(f"request {i}: a continuation of {len(continuation_ids)} tokens leaves no context "
                             f"within {limit} tokens")
        rows.append(row)
        lengths.append(len(continuation_ids))
    found = token_logprobs(model, rows, batch_size, scored_from=[len(row) - n for row, n in zip(rows, lengths)])
    return [Score(float(np.sum(chosen, dtype=np.float64)), bool(np.all(greedy)), n)
            for (chosen, greedy), n in zip(found, lengths)]


def rolling_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of the windows over ids[0:n]: ids[start:end] is one row, and its
    predictions of ids[first:end] are scored (each id from 1 on exactly once)."""
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1], got stride {stride}, window {window}")
    windows, scored, start = [], 1, 0
    while scored < n:
        end = min(start + window, n)
        windows.append((start, end, scored))
        scored, start = end, start + stride
    return windows


def rolling_loglikelihoods(model, texts: Sequence[Text], window: Optional[int] = None,
                           stride: Optional[int] = None, batch_size: int = 8,
                           progress: bool = False) -> list[RollingScore]:
    """Each document's log-likelihood (a text with `<s>` in front, or ids as they are) over overlapping
    windows of `window` tokens every `stride` tokens (module docstring); the windows of all the
    documents run together."""
    window = model.config.context_length if window is None else window
    stride = window // 2 if stride is None else stride
    if not 2 <= window <= model.config.context_length:
        raise ValueError(f"window must be in [2, {model.config.context_length}], got {window}")
    documents = [model.tokenizer.encode(text, add_bos=True) if isinstance(text, str) else list(text)
                 for text in texts]
    rows, scored_from, owners = [], [], []
    for d, ids in enumerate(documents):
        if len(ids) < 2:
            raise ValueError(f"document {d} has no token to score after <s>")
        for start, end, first in rolling_windows(len(ids), window, stride):
            rows.append(ids[start:end])
            scored_from.append(first - start)
            owners.append(d)
    totals = [0.0] * len(documents)
    for d, (chosen, _) in zip(owners, token_logprobs(model, rows, batch_size, progress, scored_from)):
        totals[d] += float(np.sum(chosen, dtype=np.float64))
    return [RollingScore(total, len(ids) - 1) for total, ids in zip(totals, documents)]


def loglikelihood_rolling(model, text: Text, window: Optional[int] = None, stride: Optional[int] = None,
                          batch_size: int = 8, progress: bool = False) -> RollingScore:
    """One document's rolling log-likelihood (rolling_loglikelihoods)."""
    return rolling_loglikelihoods(model, [text], window, stride, batch_size, progress)[0]
