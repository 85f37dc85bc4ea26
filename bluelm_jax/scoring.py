"""Scoring text: the log-likelihood of continuations and of whole documents (perplexity).

    loglikelihood(model, [(context, continuation), ...])  -> [Score(logprob, is_greedy, tokens)]
    loglikelihood_rolling(model, text, window=None, stride=None) -> RollingScore

Both reduce to `token_logprobs`: for each token sequence, log p(ids[i+1] | ids[:i+1]) and
whether ids[i+1] is the argmax there, from one causal forward pass per row in float32
log-softmax. Rows are grouped by their padded length (`score_width`: a multiple of 64 tokens
up to 1,024, the prompt bucket beyond, as planning.bucket_length gives) and run in
batches of `batch_size` rows, a smaller last batch padded with empty rows to a power of two,
so one width compiles at most log2(batch_size) + 2 programs, whatever the lengths within it;
`TRACE_COUNTS["scoring"]` counts the traces. Padding goes on the
right: attention is causal, so it changes no scored position.

Texts are tokenized as lm-evaluation-harness does for a causal model: the context with `<s>`
in front, and the continuation as the tokens that context + continuation has beyond the
context's own (so a word split across the boundary is scored as the model would read it).
A row longer than the model's context keeps its last `context_length` tokens.

Rolling log-likelihood scores a document in windows of `window` tokens (default: the model's
context) that start every `stride` tokens (default: half a window), so that each window after
the first re-reads `window - stride` tokens as context and scores only the tokens no earlier
window scored; the first token (`<s>`) is never scored. A document that fits one window is
scored exactly as `token_logprobs` of the whole.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax.model import forward
from bluelm_jax.planning import bucket_length

TRACE_COUNTS: collections.Counter = collections.Counter()  # "scoring" -> traces of the compiled scorer
WIDTH_QUANTUM = 64  # rows up to FINE_WIDTHS_UP_TO tokens are padded to a multiple of this
FINE_WIDTHS_UP_TO = 1024
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
def _score_batch(params: dict, tokens: jax.Array, config, compute_dtype, top_k: int = 0,
                 pieces: Optional[int] = None) -> tuple[jax.Array, ...]:
    """tokens [batch, width] -> (log p(tokens[:, 1:]) [batch, width - 1] float32, greedy [batch, width - 1]),
    and with top_k > 0 the top_k log-probabilities and ids among the first `pieces` ids at each
    position ([batch, width - 1, top_k] each)."""
    TRACE_COUNTS["scoring"] += 1
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, tokens, positions, config, compute_dtype=compute_dtype)  # [batch, width, vocab]
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]  # [batch, width - 1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    found = (chosen, jnp.argmax(logits, axis=-1) == targets)
    return found + tuple(jax.lax.top_k(logprobs[..., :pieces], top_k)) if top_k else found


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
    tokens = np.full((1, score_width(n)), model.config.pad_token_id, np.int32)  # [1, width]
    tokens[0, :n] = ids
    pieces = min(model.config.vocab_size, model.tokenizer.vocab_size)
    chosen, _, top_lp, top_ids = jax.device_get(_score_batch(model.params, jnp.asarray(tokens), model.config,
                                                             jnp.dtype(model.compute_dtype), max(k, 1), pieces))
    return TokenScores(chosen[0, :n - 1], top_ids[0, :n - 1, :k], top_lp[0, :n - 1, :k])


def score_width(n: int) -> int:
    """The padded length a row of n tokens is scored at: a multiple of WIDTH_QUANTUM up to
    FINE_WIDTHS_UP_TO (short rows, where the quantum wastes little and there are few widths),
    the prompt bucket (a power of two) beyond."""
    if n <= FINE_WIDTHS_UP_TO:
        return -(-n // WIDTH_QUANTUM) * WIDTH_QUANTUM
    return bucket_length(n)


def token_logprobs(model, rows: Sequence[Sequence[int]], batch_size: int = 8,
                   progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each id sequence (at least 2 ids, at most the model's context): (log p(ids[i+1] | ids[:i+1])
    [n - 1] float32, is ids[i+1] the argmax [n - 1] bool). Rows run in batches of `batch_size` per
    prompt bucket (module docstring); `progress` shows a bar of the tokens scored (stderr)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = model.config.context_length
    for i, row in enumerate(rows):
        if not 2 <= len(row) <= limit:
            raise ValueError(f"row {i} has {len(row)} tokens: scoring needs 2 to {limit} (the model's context)")
    by_bucket: dict[int, list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        by_bucket[score_width(len(row))].append(i)
    found: list = [None] * len(rows)
    pad = model.config.pad_token_id
    from tqdm import tqdm

    bar = tqdm(total=sum(len(row) - 1 for row in rows), unit="tok", desc="scoring", disable=not progress,
               file=sys.stderr)
    for width, members in sorted(by_bucket.items()):
        for at in range(0, len(members), batch_size):
            batch = members[at:at + batch_size]
            rows_in_batch = min(batch_size, 1 << (len(batch) - 1).bit_length())  # a power of two (or batch_size)
            tokens = np.full((rows_in_batch, width), pad, np.int32)  # [rows, width]: empty rows pad the batch
            for r, i in enumerate(batch):
                tokens[r, :len(rows[i])] = rows[i]
            chosen, greedy = jax.device_get(_score_batch(model.params, jnp.asarray(tokens), model.config,
                                                         jnp.dtype(model.compute_dtype)))
            for r, i in enumerate(batch):
                n = len(rows[i]) - 1
                found[i] = (chosen[r, :n], greedy[r, :n])
                bar.update(n)
    bar.close()
    return found


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


def loglikelihood(model, requests: Sequence[tuple[Text, Text]], batch_size: int = 8) -> list[Score]:
    """The log-likelihood of each continuation after its context (texts or id lists), in order."""
    rows, lengths = [], []
    limit = model.config.context_length
    for i, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(model, context, continuation)
        if not continuation_ids:
            raise ValueError(f"request {i}: the continuation has no tokens")
        if not context_ids:
            raise ValueError(f"request {i}: the context has no tokens (give at least <s>)")
        row = (context_ids + continuation_ids)[-limit:]
        if len(continuation_ids) >= len(row):
            raise ValueError(f"request {i}: a continuation of {len(continuation_ids)} tokens leaves no context "
                             f"within the model's {limit}")
        rows.append(row)
        lengths.append(len(continuation_ids))
    scores = []
    for (chosen, greedy), n in zip(token_logprobs(model, rows, batch_size), lengths):
        scores.append(Score(float(np.sum(chosen[-n:], dtype=np.float64)), bool(np.all(greedy[-n:])), n))
    return scores


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


def loglikelihood_rolling(model, text: Text, window: Optional[int] = None, stride: Optional[int] = None,
                          batch_size: int = 8, progress: bool = False) -> RollingScore:
    """A document's log-likelihood (text with `<s>` in front, or ids as they are) over overlapping windows
    of `window` tokens every `stride` tokens (module docstring)."""
    ids = model.tokenizer.encode(text, add_bos=True) if isinstance(text, str) else list(text)
    window = model.config.context_length if window is None else window
    stride = window // 2 if stride is None else stride
    if not 2 <= window <= model.config.context_length:
        raise ValueError(f"window must be in [2, {model.config.context_length}], got {window}")
    if len(ids) < 2:
        raise ValueError("the document has no token to score after <s>")
    windows = rolling_windows(len(ids), window, stride)
    results = token_logprobs(model, [ids[start:end] for start, end, _ in windows], batch_size, progress)
    total = 0.0
    for (start, end, first), (chosen, _) in zip(windows, results):
        total += float(np.sum(chosen[first - start - 1:], dtype=np.float64))  # chosen[j] predicts ids[start + j + 1]
    return RollingScore(total, len(ids) - 1)
