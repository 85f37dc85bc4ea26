"""Logits processors and token sampling, as pure functions of (logits, state, key).

Hugging Face semantics and order (`transformers` `generate`): the repetition penalty is
applied to the raw logits, then temperature, top-k and top-p (the three "warpers",
only when sampling). Greedy decoding takes the argmax after the penalty.

Settings are split in two, like the gemma sampler:

* `SamplerSettings` is static and hashable (whether to sample, top-k, the tokenizer's
  vocabulary size): a compiled decode loop is specialised on it.
* `SamplerParams` holds traced per-row values (temperature, top-p, repetition penalty):
  changing them never recompiles. Neutral values (1.0, 1.0, 1.0) are exact no-ops.

For batches whose rows come and go (engine.py), `RowSettings` makes whether to sample and
top-k traced [batch] arrays too, and `sample_rows` gives each row the token `sample` gives
it alone with the same settings.

Ids at or above `vocab_limit` (the embedding has more rows than the tokenizer has
pieces) get -inf before anything else, so they are never produced.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Static (hashable) sampling settings; a change compiles a new decode loop."""

    do_sample: bool = False  # False: greedy (argmax)
    top_k: int = 0  # 0: off
    vocab_limit: Optional[int] = None  # ids >= this are never produced (tokenizer size)

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.vocab_limit is not None and self.vocab_limit <= 0:
            raise ValueError(f"vocab_limit must be positive, got {self.vocab_limit}")


class SamplerParams(NamedTuple):
    """Traced per-row values; a change never recompiles."""

    temperature: jax.Array  # [batch] float32, > 0 (ignored when greedy)
    top_p: jax.Array  # [batch] float32 in (0, 1]; 1 = off
    repetition_penalty: jax.Array  # [batch] float32 > 0; 1 = off


def make_params(batch: int, temperature: float = 1.0, top_p: float = 1.0,
                repetition_penalty: float = 1.0) -> SamplerParams:
    """Per-row parameters from scalars or sequences of length `batch` (validated)."""

    def rows(name, value, ok, why):
        arr = np.broadcast_to(np.asarray(value, np.float32), (batch,)).copy()
        if not np.all(np.isfinite(arr)) or not np.all(ok(arr)):
            raise ValueError(f"{name} must be {why}, got {value!r}")
        return jnp.asarray(arr)

    return SamplerParams(
        temperature=rows("temperature", temperature, lambda a: a > 0, "> 0"),
        top_p=rows("top_p", top_p, lambda a: (a > 0) & (a <= 1), "in (0, 1]"),
        repetition_penalty=rows("repetition_penalty", repetition_penalty, lambda a: a > 0, "> 0"),
    )


def row_keys(seeds: Union[int, None, Sequence[Optional[int]]], batch: int) -> jax.Array:
    """[batch, 2] uint32 PRNG keys, one per row from its seed (None: a fresh random seed).

    A row's samples depend only on its own seed, so a prompt gives the same sample with
    the same seed alone or inside a batch."""
    if seeds is None or isinstance(seeds, (int, np.integer)):
        seeds = [seeds] * batch
    seeds = list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
    fresh = [int.from_bytes(os.urandom(4), "little") for _ in seeds]
    values = []
    for s, f in zip(seeds, fresh):
        s = f if s is None else int(s)
        if not 0 <= s < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {s}")
        values.append(s)
    return jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(values, np.uint32)))


# ------------------------------------------------------------------ processors


def mask_vocab(logits: jax.Array, vocab_limit: Optional[int]) -> jax.Array:
    """-inf for ids >= vocab_limit. logits: [batch, vocab]."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids[None, :] < vocab_limit, logits, NEG_INF)


def seen_mask(tokens: jax.Array, valid: jax.Array, vocab: int) -> jax.Array:
    """[batch, vocab] bool: which ids occur among the valid tokens. tokens, valid: [batch, seq]."""
    batch = tokens.shape[0]
    ids = jnp.where(valid, tokens, vocab)  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], tokens.shape)
    return jnp.zeros((batch, vocab), bool).at[rows, ids].set(True, mode="drop")


def mark_seen(seen: jax.Array, token: jax.Array) -> jax.Array:
    """Adds one token per row. seen: [batch, vocab] bool, token: [batch]."""
    return seen.at[jnp.arange(seen.shape[0]), token].set(True, mode="drop")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty
    when positive, multiplied when negative. logits, seen: [batch, vocab]; penalty: [batch]."""
    p = penalty[:, None].astype(logits.dtype)
    penalized = jnp.where(logits < 0, logits * p, logits / p)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """HF TemperatureLogitsWarper. temperature: [batch]."""
    return logits / temperature[:, None].astype(logits.dtype)


def _sorted_descending(logits: jax.Array, top_k: int) -> jax.Array:
    """The top_k largest logits (all of them when top_k is 0), descending. [batch, k]."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        return jax.lax.top_k(logits, top_k)[0]
    return -jnp.sort(-logits, axis=-1)


def apply_top_k(logits: jax.Array, top_k: int, candidates: Optional[jax.Array] = None) -> jax.Array:
    """HF TopKLogitsWarper: -inf below the k-th largest logit (ties kept). top_k is static."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    if candidates is None:
        candidates = _sorted_descending(logits, top_k)
    kth = candidates[:, top_k - 1 : top_k]  # [batch, 1]
    return jnp.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array, candidates: Optional[jax.Array] = None) -> jax.Array:
    """HF TopPLogitsWarper: drop the least likely tokens whose cumulative probability is
    <= 1 - top_p, always keeping the most likely one. top_p: [batch], traced (1 = no-op).

    `candidates` (descending) may be only the top-k logits when top-k was applied first:
    every other token then has probability 0 and is removed anyway."""
    if candidates is None:
        candidates = _sorted_descending(logits, 0)
    ascending = candidates[:, ::-1]  # [batch, k]
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = cumulative <= (1.0 - top_p[:, None])
    remove = remove.at[:, -1].set(False)
    # the removed tokens are a prefix of the ascending order: the first kept one is the threshold
    n_removed = jnp.sum(remove, axis=-1)  # [batch]
    threshold = jnp.take_along_axis(ascending, n_removed[:, None], axis=-1)  # [batch, 1]
    return jnp.where(logits < threshold, NEG_INF, logits)


def process_logits(logits: jax.Array, seen: jax.Array, params: SamplerParams,
                   settings: SamplerSettings) -> jax.Array:
    """All processors in Hugging Face order; the distribution that is sampled (or argmaxed).
    logits: [batch, vocab] -> [batch, vocab] float32."""
    logits = mask_vocab(logits.astype(jnp.float32), settings.vocab_limit)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not settings.do_sample:
        return logits
    logits = apply_temperature(logits, params.temperature)
    candidates = _sorted_descending(logits, settings.top_k)  # one sort/top_k for both warpers
    logits = apply_top_k(logits, settings.top_k, candidates)
    return apply_top_p(logits, params.top_p, candidates)


def draw(logits: jax.Array, keys: jax.Array, steps: jax.Array) -> jax.Array:
    """One sample per row from processed logits [batch, vocab]; keys: [batch, 2] per-row base
    keys, each folded with its row's step (steps: [batch] or one scalar for every row), so
    every step draws fresh numbers and a row's draw depends only on its key and step.
    Returns [batch] int32."""
    steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), keys.shape[:1])
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)  # [batch, 2]
    categorical = jax.vmap(lambda k, row: jax.random.categorical(k, row))
    return categorical(step_keys, logits).astype(jnp.int32)


def sample(logits: jax.Array, seen: jax.Array, params: SamplerParams, keys: jax.Array,
           step: jax.Array, settings: SamplerSettings) -> jax.Array:
    """The next token of each row. logits: [batch, vocab]; keys: [batch, 2] per-row base
    keys, folded with `step` so every step draws fresh numbers. Returns [batch] int32."""
    logits = process_logits(logits, seen, params, settings)
    if not settings.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return draw(logits, keys, step)


# ------------------------------------------------------------------ per-row settings


class RowSettings(NamedTuple):
    """Traced per-row settings, for batches whose rows come and go (the serving engine):
    what `SamplerSettings` makes static (whether to sample, top-k) is a [batch] array here,
    so rows with any settings share one compiled step."""

    params: SamplerParams  # [batch] temperature (1 for greedy rows), top_p, repetition_penalty
    do_sample: jax.Array  # [batch] bool: False = greedy
    top_k: jax.Array  # [batch] int32: 0 = off


def apply_top_k_rows(logits: jax.Array, top_k: jax.Array, candidates: jax.Array) -> jax.Array:
    """`apply_top_k` with a traced k per row. top_k: [batch] int32 (0 or >= vocab: off);
    candidates: the full descending sort of `logits` [batch, vocab]. The k-th largest value
    is the same number `lax.top_k` gives, so the result equals `apply_top_k` for that k."""
    vocab = logits.shape[-1]
    off = (top_k <= 0) | (top_k >= vocab)  # [batch]
    kth = jnp.take_along_axis(candidates, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)  # [batch, 1]
    kth = jnp.where(off[:, None], NEG_INF, kth)
    return jnp.where(logits < kth, NEG_INF, logits)


def top_k_candidates(candidates: jax.Array, top_k: jax.Array) -> jax.Array:
    """The descending candidates [batch, vocab] cut to each row's first top_k [batch] (0: all):
    the rest become -inf, which `apply_top_p` then removes as tokens of probability 0, as the
    static path's k-long candidate list leaves them out."""
    rank = jnp.arange(candidates.shape[-1])[None, :]  # [1, vocab]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    return jnp.where(keep, candidates, NEG_INF)


def sample_rows(logits: jax.Array, seen: jax.Array, rows: RowSettings, keys: jax.Array, steps: jax.Array,
                vocab_limit: Optional[int]) -> jax.Array:
    """`sample` with per-row traced settings: each row's token equals what `sample` gives for
    that row alone with its settings as `SamplerSettings`. logits: [batch, vocab]; steps:
    [batch] int32 (each row's own step). The warpers (one full sort) run only when some row
    samples. Returns [batch] int32."""
    greedy = SamplerSettings(do_sample=False, vocab_limit=vocab_limit)
    penalized = process_logits(logits, seen, rows.params, greedy)  # [batch, vocab] float32
    argmax = jnp.argmax(penalized, axis=-1).astype(jnp.int32)

    def sampled(_):
        warped = apply_temperature(penalized, rows.params.temperature)
        candidates = _sorted_descending(warped, 0)
        warped = apply_top_k_rows(warped, rows.top_k, candidates)
        warped = apply_top_p(warped, rows.params.top_p, top_k_candidates(candidates, rows.top_k))
        return jnp.where(rows.do_sample, draw(warped, keys, steps), argmax)

    return jax.lax.cond(jnp.any(rows.do_sample), sampled, lambda _: argmax, None)
