"""The device side of generation: prefill, the compiled decode loop, and one streamed step.

1. `prefill` (one jitted call) allocates the KV cache, runs the whole left-padded prompt
   [batch, bucket] through the model, and samples the first token. Row b's real tokens
   occupy cache slots start[b] .. bucket-1; its positions are `slot - start[b]`.
2. `decode_loop` (one jitted `lax.while_loop`, the state donated so that the cache is
   updated in place) runs `decode_step` until every row has stopped or a step bound is
   reached. `stream_step` is the same step jitted alone, for token-by-token streaming.

Sampling settings are split as in sampling.py: whether to sample and top-k are static
(`Static`); temperature, top-p, repetition penalty, seeds, stop ids and per-row token
limits are traced (`Request`), so changing them never recompiles. `TRACE_COUNTS` counts
the traces (compilations) of each jitted function, for tests.

A row stops at any stop id (reason STOP) or when it reaches its token limit (LENGTH).
Stop strings are text: the host finds them (detokenizer.py) and ends rows with
`mark_stopped`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bluelm_jax import sampling
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.model import KVCache, forward, init_cache

RUNNING, STOP, LENGTH = 0, 1, 2
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}

TRACE_COUNTS: collections.Counter = collections.Counter()  # jitted function -> traces


class Request(NamedTuple):
    """Traced per-call constants of the decode loop."""

    sampler: sampling.SamplerParams  # [batch] temperature, top_p, repetition_penalty
    limit: jax.Array  # [batch] int32: most new tokens for each row (0: padding row)
    stop_ids: jax.Array  # [n] int32, padded with -1


class DecodeState(NamedTuple):
    """Everything the decode loop carries; donated to each compiled call."""

    cache: KVCache
    token: jax.Array  # [batch] int32: the last token, input of the next step
    tokens: jax.Array  # [batch, width] int32: the tokens generated so far (pad after)
    count: jax.Array  # [batch] int32: how many tokens each row has generated
    step: jax.Array  # [] int32: decode steps taken (columns of `tokens` written)
    done: jax.Array  # [batch] bool
    reason: jax.Array  # [batch] int32: RUNNING, STOP or LENGTH
    seen: jax.Array  # [batch, vocab] bool: ids in the prompt or output (repetition penalty)
    keys: jax.Array  # [batch, 2] uint32: each row's PRNG key


KV_CACHE_DTYPES = ("auto", "int8")  # "auto" (or None): the compute dtype


def kv_cache_dtype_name(value) -> Optional[str]:
    """The KV cache setting `value` as stored: None for the compute dtype (None or "auto"), or "int8".
    ValueError for anything else."""
    if value is None or value == "auto":
        return None
    if value == "int8":
        return value
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (or None), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Static:
    """The hashable, static part of a compiled call."""

    config: BlueLMConfig
    sampler: sampling.SamplerSettings
    compute_dtype: Any
    pad_id: int
    kv_cache_dtype: Optional[str] = None  # None: the cache in the compute dtype; "int8": int8 with scales

    @property
    def cache_dtype(self):
        """The dtype `init_cache` makes the KV cache in."""
        return jnp.int8 if self.kv_cache_dtype == "int8" else self.compute_dtype


# --------------------------------------------------------------------------- pure steps


def prefill_logits(params: dict, tokens: jax.Array, start: jax.Array, cache_len: int, config: BlueLMConfig,
                   compute_dtype=jnp.float32, cache_dtype=None) -> tuple[jax.Array, KVCache]:
    """Fills a new cache of `cache_len` slots with a left-padded prompt.

    tokens: [batch, bucket]; start: [batch] first real slot of each row; cache_dtype: the
    cache's (None: compute_dtype; jnp.int8: an int8 cache).
    Returns the next-token logits [batch, vocab] (float32) and the cache (index = bucket).
    """
    batch, bucket = tokens.shape
    cache_dtype = compute_dtype if cache_dtype is None else cache_dtype
    cache = init_cache(config, batch, cache_len, dtype=cache_dtype, start=start)
    positions = jnp.maximum(jnp.arange(bucket, dtype=jnp.int32)[None, :] - start[:, None], 0)  # [batch, bucket]
    logits, cache = forward(params, tokens, positions, config, cache=cache, compute_dtype=compute_dtype,
                            last_only=True)
    return logits[:, -1], cache


def decode_logits(params: dict, token: jax.Array, cache: KVCache, config: BlueLMConfig,
                  compute_dtype=jnp.float32) -> tuple[jax.Array, KVCache]:
    """One token per row into the cache. token: [batch]. Returns logits [batch, vocab], cache."""
    positions = jnp.maximum(cache.index - cache.start, 0)[:, None]  # [batch, 1]
    logits, cache = forward(params, token[:, None], positions, config, cache=cache, compute_dtype=compute_dtype)
    return logits[:, -1], cache


def count_token(token: jax.Array, done: jax.Array, reason: jax.Array, count: jax.Array, stop_ids: jax.Array,
                limit: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Counts the new `token` [batch] of the running rows (not `done` [batch]) and ends those that
    sampled a stop id (STOP) or reached their `limit` [batch] of tokens (LENGTH).
    stop_ids: [n] for every row or [batch, n] per row, padded with -1. Returns (count, done, reason)."""
    live = ~done
    count = count + live.astype(jnp.int32)
    stop_ids = stop_ids if stop_ids.ndim == 2 else stop_ids[None, :]  # [batch or 1, n]
    is_stop = live & jnp.any(token[:, None] == stop_ids, axis=-1)
    at_limit = live & ~is_stop & (count >= limit)
    reason = jnp.where(is_stop, STOP, jnp.where(at_limit, LENGTH, reason)).astype(jnp.int32)
    return count, done | is_stop | at_limit, reason


def _record(state: DecodeState, token: jax.Array, request: Request) -> DecodeState:
    """Appends the sampled `token` [batch] to the rows still running; updates stop flags."""
    live = ~state.done  # [batch]
    width = state.tokens.shape[1]
    col = jnp.minimum(state.step, width - 1)
    old = jax.lax.dynamic_slice_in_dim(state.tokens, col, 1, axis=1)[:, 0]
    column = jnp.where(live, token, old)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, column[:, None], col, axis=1)
    count, done, reason = count_token(token, state.done, state.reason, state.count, request.stop_ids, request.limit)
    return state._replace(token=token, tokens=tokens, count=count, step=state.step + 1, done=done, reason=reason,
                          seen=sampling.mark_seen(state.seen, token))


def _prefill(params, tokens, start, request: Request, keys, static: Static, cache_len: int,
             width: int) -> DecodeState:
    """Prompt -> cache, and the first generated token. tokens: [batch, bucket]."""
    TRACE_COUNTS["prefill"] += 1
    c = static.config
    logits, cache = prefill_logits(params, tokens, start, cache_len, c, static.compute_dtype, static.cache_dtype)
    batch, bucket = tokens.shape
    valid = jnp.arange(bucket)[None, :] >= start[:, None]  # [batch, bucket]
    state = DecodeState(
        cache=cache,
        token=jnp.zeros((batch,), jnp.int32),
        tokens=jnp.full((batch, width), static.pad_id, jnp.int32),
        count=jnp.zeros((batch,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=request.limit <= 0,
        reason=jnp.zeros((batch,), jnp.int32),
        seen=sampling.seen_mask(tokens, valid, c.vocab_size),
        keys=keys,
    )
    token = sampling.sample(logits, state.seen, request.sampler, keys, state.step, static.sampler)
    return _record(state, token, request)


def decode_step(params, state: DecodeState, request: Request, static: Static) -> DecodeState:
    """Feeds the last token, samples the next: the body of the loop and of `stream_step`."""
    logits, cache = decode_logits(params, state.token, state.cache, static.config, static.compute_dtype)
    state = state._replace(cache=cache)
    token = sampling.sample(logits, state.seen, request.sampler, state.keys, state.step, static.sampler)
    return _record(state, token, request)


def _decode_loop(params, state: DecodeState, request: Request, until: jax.Array, static: Static) -> DecodeState:
    """Decode steps until every row is done or `until` steps were taken (traced bound)."""
    TRACE_COUNTS["decode_loop"] += 1

    def running(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    return jax.lax.while_loop(running, lambda s: decode_step(params, s, request, static), state)


def _stream_step(params, state: DecodeState, request: Request, static: Static):
    """One decode step; returns the state and (token, done, reason) to read on the host.

    A streaming caller dispatches a step before it knows that the previous one finished the
    row: that extra step writes only within the buffers (indices are clamped) and its result
    is dropped. (No `lax.cond` to skip it: a pass-through branch may copy the whole cache.)"""
    TRACE_COUNTS["stream_step"] += 1
    state = decode_step(params, state, request, static)
    return state, (state.token, state.done, state.reason)


@functools.partial(jax.jit, donate_argnames=("state",))
def mark_stopped(state: DecodeState, stopped: jax.Array) -> DecodeState:
    """Ends the rows where `stopped` [batch] is set (found a stop string), reason STOP."""
    return state._replace(done=state.done | stopped, reason=jnp.where(stopped, STOP, state.reason))


prefill = jax.jit(_prefill, static_argnames=("static", "cache_len", "width"))
decode_loop = jax.jit(_decode_loop, static_argnames=("static",), donate_argnames=("state",))
stream_step = jax.jit(_stream_step, static_argnames=("static",), donate_argnames=("state",))
