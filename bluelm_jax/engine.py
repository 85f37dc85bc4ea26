"""A continuous-batching decode engine: many requests share one compiled decode step.

The engine owns `max_batch` rows (slots) over one preallocated KV cache (per layer
[max_batch, kv_heads, slots, head_dim], in the compute dtype or, with `kv_cache_dtype="int8"`,
int8 plus float32 scales [max_batch, kv_heads, slots]) and a background thread that runs the
device loop. Callers `submit` an `EngineRequest` (token ids and sampling settings) and get
a `Handle` that streams the generated ids (sync or async) and can be cancelled.

Layout. All rows share the cache's one write index I (model.py's KVCache); a request's
prompt is RIGHT-aligned to I when it is admitted: its tokens sit at slots [I - L, I) and
`start[b] = I - L`, so its positions are `slot - start[b]` as in `generate`. Admission:

1. prefill the prompt alone exactly as `generate` does for one prompt (left-padded to its
   bucket, its own cache of `bucket` slots); a prompt longer than `prefill_chunk` is fed in
   chunks of that many tokens, with a decode block of the running rows between chunks;
2. write its cache block into a free row at slots [I - bucket, I) (`_admit`), set the row's
   start, seen mask, key, settings, limit and stop ids, and sample its first token.

When I is smaller than the block, every row is first shifted right (`_shift`); when I
reaches the end of the cache, every row is shifted left by the smallest start among the
running rows. Free rows stay in the batch, done.

Decode. `_decode_block` runs up to `steps_per_sync` decode steps (a `lax.while_loop`) and
returns a [batch, steps_per_sync] block of tokens (-1: no token) to the host. The model part
of a step is `decode.decode_logits`, as in `generate`; sampling is
`sampling.sample_rows`, whose settings (temperature, top-p, top-k, repetition penalty,
greedy or not) are traced per row, as are keys, token limits and stop ids, so nothing
recompiles as requests come and go: shapes depend only on the prompt bucket.
`TRACE_COUNTS` (shared with decode.py, keys "engine.*") counts the traces.

Widths. A decode block computes only the first `rows` rows: the smallest of `widths` (1, 2,
4, ..., max_batch) that holds the running ones. Before each block the last running rows are
moved into the free rows before them (`_move_row`: one row of each cache buffer), so a step
costs what its running rows need, not what max_batch would (a batch-16 step of the medium
shape costs about 3.5 batch-1 steps on a 2-core CPU). `warm_up` compiles every width.

Exactness: a greedy request's ids equal `generate`'s for that prompt alone, and a seeded
sampled request draws with the same key schedule (row key folded with the row's token
count), so it equals its solo `generate` result too.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any, AsyncIterator, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import sampling, sharding
from bluelm_jax.decode import (FINISH_REASONS, RUNNING, TRACE_COUNTS, Static, count_token, decode_logits,
                               kv_cache_dtype_name)
from bluelm_jax.model import KVCache, forward, init_cache
from bluelm_jax.planning import PROMPT_BUCKETS, ContextOverflowError, GenerationSettings, bucket_length, tokenizer_of

__all__ = ["Engine", "EngineRequest", "Handle", "QueueFullError", "EngineStats", "ContextOverflowError"]

NO_TOKEN = -1  # a cell of a decode block where the row produced nothing


class QueueFullError(RuntimeError):
    """`max_queue` requests are already waiting for a slot."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One request: prompt ids and sampling settings (temperature 0: greedy; top_k 0: off).

    stop_ids are every id that ends the request (the engine adds none)."""

    prompt_ids: tuple
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_ids: tuple = ()

    def __post_init__(self):
        for name in ("prompt_ids", "stop_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a sequence of token ids, got {value!r:.60}")
            value = tuple(value)
            if not all(_is_int(i) and i >= 0 for i in value):
                raise ValueError(f"{name} must hold non-negative integer token ids, got {value!r:.60}")
            object.__setattr__(self, name, tuple(int(i) for i in value))
        if not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k)
        sampling.make_params(1, top_p=self.top_p, repetition_penalty=self.repetition_penalty)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def do_sample(self) -> bool:
        return float(self.temperature) > 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    active_slots: int
    queue_depth: int
    max_batch: int
    max_queue: int
    tokens_generated: int
    finished: dict
    compiles: int


def compile_count() -> int:
    """How many times the engine's jitted functions were traced (in this process)."""
    return sum(n for name, n in TRACE_COUNTS.items() if name.startswith("engine."))


# --------------------------------------------------------------------------- handle


class Handle:
    """The caller's side of one request: its ids as they come, its end, cancel/stop."""

    def __init__(self, engine: "Engine", request: EngineRequest):
        self._engine, self.request = engine, request
        self._cond = threading.Condition()
        self._ids: list[int] = []
        self._waiters: set = set()  # (event loop, asyncio.Event) of async readers
        self._release: Optional[str] = None  # "cancelled" / "stop": asked by the caller
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None  # set when the engine failed
        self.prompt_tokens = len(request.prompt_ids)
        self.submitted_at = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    @property
    def completion_tokens(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[int]:
        """The ids generated so far (a copy)."""
        with self._cond:
            return list(self._ids)

    # ---- engine side

    def _push(self, ids: list[int], finish_reason: Optional[str] = None,
              error: Optional[BaseException] = None) -> None:
        now = time.perf_counter()
        with self._cond:
            if self.finish_reason is not None:
                return
            if ids and self.first_token_at is None:
                self.first_token_at = now
            self._ids.extend(ids)
            if finish_reason is not None:
                self.finish_reason, self.error, self.finished_at = finish_reason, error, now
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    # ---- caller side

    def cancel(self) -> None:
        """The client went away: the slot is freed at the next step (finish_reason "cancelled")."""
        self._ask_release("cancelled")

    def stop(self) -> None:
        """The caller found a stop string: the slot is freed like `cancel`, finish_reason "stop"."""
        self._ask_release("stop")

    def _ask_release(self, reason: str) -> None:
        with self._cond:
            if self.finish_reason is not None or self._release is not None:
                return
            self._release = reason
        self._engine._wake()

    def _check_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine failed: {self.error}") from self.error

    def tokens(self, timeout: Optional[float] = None) -> Iterator[int]:
        """The generated ids as they come; ends when the request finishes. TimeoutError when
        no id and no end comes within `timeout` seconds."""
        seen = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._ids) > seen or self.finish_reason is not None, timeout):
                    raise TimeoutError(f"no token within {timeout} s")
                new, finished = self._ids[seen:], self.finish_reason is not None
            yield from new
            seen += len(new)
            if finished:
                self._check_error()
                return

    async def atokens(self) -> AsyncIterator[int]:
        """`tokens` for asyncio callers; never blocks the event loop."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._waiters.add(entry)
        try:
            seen = 0
            while True:
                entry[1].clear()
                with self._cond:
                    new, finished = self._ids[seen:], self.finish_reason is not None
                for token in new:
                    yield token
                seen += len(new)
                if finished:
                    self._check_error()
                    return
                if not new:
                    await entry[1].wait()
        finally:
            with self._cond:
                self._waiters.discard(entry)

    def result(self, timeout: Optional[float] = None) -> list[int]:
        """Waits for the end; all generated ids. TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s")
        self._check_error()
        return self.ids


# --------------------------------------------------------------------------- device state


class EngineState(NamedTuple):
    """Everything the device loop carries; donated to each compiled call. [batch] per row."""

    cache: KVCache  # one write index for every row; start[b]: row b's first slot
    token: jax.Array  # [batch] int32: the last token, input of the next step
    count: jax.Array  # [batch] int32: tokens generated (the sampling step of the row)
    done: jax.Array  # [batch] bool: finished or free
    reason: jax.Array  # [batch] int32: RUNNING, STOP or LENGTH
    seen: jax.Array  # [batch, vocab] bool: ids in the prompt or output (repetition penalty)
    keys: jax.Array  # [batch, 2] uint32
    rows: sampling.RowSettings  # [batch] sampling settings
    limit: jax.Array  # [batch] int32: most new tokens
    stop_ids: jax.Array  # [batch, max_stop_ids] int32, padded with -1


class RowInput(NamedTuple):
    """Host values of one admitted row (traced: a new request never recompiles)."""

    temperature: np.ndarray  # [] float32 (1 for greedy)
    top_p: np.ndarray
    repetition_penalty: np.ndarray
    do_sample: np.ndarray  # [] bool
    top_k: np.ndarray  # [] int32
    limit: np.ndarray  # [] int32
    stop_ids: np.ndarray  # [max_stop_ids] int32
    key: np.ndarray  # [2] uint32


def _init_state(static: Static, batch: int, slots: int, max_stop_ids: int) -> EngineState:
    TRACE_COUNTS["engine.init"] += 1
    c = static.config
    ones = jnp.ones((batch,), jnp.float32)
    return EngineState(
        cache=init_cache(c, batch, slots, dtype=static.cache_dtype),
        token=jnp.zeros((batch,), jnp.int32), count=jnp.zeros((batch,), jnp.int32),
        done=jnp.ones((batch,), bool), reason=jnp.zeros((batch,), jnp.int32),
        seen=jnp.zeros((batch, c.vocab_size), bool), keys=jnp.zeros((batch, 2), jnp.uint32),
        rows=sampling.RowSettings(sampling.SamplerParams(ones, ones, ones), jnp.zeros((batch,), bool),
                                  jnp.zeros((batch,), jnp.int32)),
        limit=jnp.zeros((batch,), jnp.int32), stop_ids=jnp.full((batch, max_stop_ids), -1, jnp.int32))


def _fresh_cache(start: jax.Array, index: jax.Array, static: Static, bucket: int) -> KVCache:
    """A one-row cache of `bucket` slots for a prompt starting at slot `start` [1]; filled up to `index`."""
    TRACE_COUNTS["engine.fresh_cache"] += 1
    cache = init_cache(static.config, 1, bucket, dtype=static.cache_dtype, start=start)
    return cache._replace(index=jnp.asarray(index, jnp.int32))


def _prefill_part(params, cache: KVCache, tokens: jax.Array, static: Static) -> tuple[jax.Array, KVCache]:
    """Feeds tokens [1, n] at the cache's index (positions slot - start, as in prefill_logits).
    Returns the last position's logits [1, vocab] and the cache."""
    TRACE_COUNTS["engine.prefill"] += 1
    n = tokens.shape[1]
    positions = jnp.maximum(cache.index + jnp.arange(n, dtype=jnp.int32)[None, :] - cache.start[:, None], 0)
    logits, cache = forward(params, tokens, positions, static.config, cache=cache,
                            compute_dtype=static.compute_dtype, last_only=True)
    return logits[:, -1], cache


def _record(state: EngineState, token: jax.Array) -> tuple[EngineState, jax.Array]:
    """Appends `token` [batch] to the running rows; updates stop flags. Returns the state and
    the column to emit [batch] (NO_TOKEN for rows that were done)."""
    count, done, reason = count_token(token, state.done, state.reason, state.count, state.stop_ids, state.limit)
    emitted = jnp.where(state.done, NO_TOKEN, token)
    return state._replace(token=token, count=count, done=done, reason=reason,
                          seen=sampling.mark_seen(state.seen, token)), emitted


def _admit(state: EngineState, row: jax.Array, part: KVCache, logits: jax.Array, tokens: jax.Array,
           length: jax.Array, new: RowInput, static: Static) -> tuple[EngineState, jax.Array]:
    """Puts a prefilled request into row `row`: its cache block right-aligned to the write index,
    its settings, and its first token (sampled from `logits` [1, vocab] at step 0).
    part: the request's one-row cache of `bucket` slots; tokens: [1, bucket] its left-padded
    prompt; length: its prompt length. Returns the state and the first token's
    (token, done, reason) [3] int32."""
    TRACE_COUNTS["engine.admit"] += 1
    c = static.config
    bucket, slots = part.max_len, state.cache.max_len
    width = min(bucket, slots)  # the block's tail that holds the prompt (bucket may exceed the cache)
    index = state.cache.index

    def put_block(layers, parts):  # per layer [batch, kv_heads, slots(, head_dim)] <- [1, kv_heads, bucket(, head_dim)]
        return tuple(jax.lax.dynamic_update_slice(x, p[:, :, bucket - width:].astype(x.dtype),
                                                  (row, 0, index - width) + (0,) * (x.ndim - 3))
                     for x, p in zip(layers, parts))

    # keys, values and (an int8 cache) their scales
    buffers = [put_block(layers, parts) for layers, parts in zip(_buffers(state.cache), _buffers(part))]
    start = state.cache.start.at[row].set(index - length)
    valid = jnp.arange(bucket)[None, :] >= bucket - length  # [1, bucket]
    seen = sampling.seen_mask(tokens, valid, c.vocab_size)  # [1, vocab]
    settings = sampling.RowSettings(
        sampling.SamplerParams(new.temperature[None], new.top_p[None], new.repetition_penalty[None]),
        new.do_sample[None], new.top_k[None])
    first = sampling.sample_rows(logits, seen, settings, new.key[None], jnp.zeros((1,), jnp.int32),
                                 static.sampler.vocab_limit)[0]
    _, first_done, reason = count_token(first[None], jnp.zeros((1,), bool), jnp.full((1,), RUNNING, jnp.int32),
                                        jnp.zeros((1,), jnp.int32), new.stop_ids, new.limit)
    first_done, reason = first_done[0], reason[0]
    put = lambda a, x: a.at[row].set(x)  # noqa: E731
    rows = sampling.RowSettings(
        sampling.SamplerParams(*(put(a, x) for a, x in zip(state.rows.params, (
            new.temperature, new.top_p, new.repetition_penalty)))),
        put(state.rows.do_sample, new.do_sample), put(state.rows.top_k, new.top_k))
    state = state._replace(
        cache=_with_buffers(state.cache, buffers)._replace(start=start), token=put(state.token, first),
        count=put(state.count, 1),
        done=put(state.done, first_done), reason=put(state.reason, reason),
        seen=put(state.seen, sampling.mark_seen(seen, first[None])[0]), keys=put(state.keys, new.key),
        rows=rows, limit=put(state.limit, new.limit), stop_ids=put(state.stop_ids, new.stop_ids))
    return state, jnp.stack([first, first_done.astype(jnp.int32), reason])


def _buffers(cache: KVCache) -> tuple[tuple, ...]:
    """The cache's per-layer buffer tuples: (k, v), and an int8 cache's (k_scale, v_scale) after them."""
    return (cache.k, cache.v) + ((cache.k_scale, cache.v_scale) if cache.quantized else ())


def _with_buffers(cache: KVCache, buffers) -> KVCache:
    """`cache` with its buffer tuples replaced by `buffers` (in `_buffers`' order)."""
    return cache._replace(**dict(zip(("k", "v", "k_scale", "v_scale"), buffers)))


def _roll_slots(x: jax.Array, delta: jax.Array) -> jax.Array:
    """One layer's keys or values [batch, kv_heads, slots, head_dim] (or an int8 cache's scales
    [batch, kv_heads, slots]) rolled `delta` slots (right when positive). Called once per buffer,
    donated: the extra memory of a shift is one layer (one call over the whole cache allocated a
    second cache)."""
    TRACE_COUNTS["engine.roll_slots"] += 1
    return jnp.roll(x, delta, axis=2)


def _shifted_starts(index: jax.Array, start: jax.Array, delta: jax.Array, free: jax.Array) -> tuple:
    """The write index and the rows' starts [batch] after a shift by `delta`; free rows [batch]
    bool get start = the new index (they see nothing)."""
    TRACE_COUNTS["engine.shift"] += 1
    index = index + delta
    return index, jnp.where(free, index, start + delta)


def _move_row(state: EngineState, src: jax.Array, dst: jax.Array) -> EngineState:
    """Copies row `src` of every per-row array (its cache rows, settings, key, ...) to row `dst`
    and ends row src (done), unless src == dst. In place: one row per layer is copied."""
    TRACE_COUNTS["engine.move_row"] += 1
    moved = jax.tree.map(lambda x: x if x.ndim == 0 else x.at[dst].set(x[src]), state)  # the index is shared
    return moved._replace(done=moved.done.at[src].set(moved.done[src] | (src != dst)))


def _decode_block(params, state: EngineState, steps: jax.Array, release: jax.Array, static: Static,
                  width: int, rows: int) -> tuple[EngineState, jax.Array, jax.Array]:
    """Ends the rows in `release` [batch] bool, then runs up to `steps` (traced, <= width) decode
    steps of rows [0, rows) while one of them runs (rows: static; the rows after them must be
    free: they are neither computed nor advanced). Returns the state, the tokens [batch, width]
    (NO_TOKEN: none) and the number of steps taken [] (the write index advanced by as many)."""
    TRACE_COUNTS["engine.decode_block"] += 1
    batch = state.token.shape[0]
    state = state._replace(done=state.done | release)
    if rows < batch:  # the steps run on a copy of the first rows, written back in place
        head = jax.tree.map(lambda x: x if x.ndim == 0 else x[:rows], state)
        head, out, taken = _decode_steps(params, head, steps, static, width)
        state = jax.tree.map(lambda x, h: h if x.ndim == 0 else jax.lax.dynamic_update_slice_in_dim(x, h, 0, axis=0),
                             state, head)
        return state, jnp.pad(out, ((0, batch - rows), (0, 0)), constant_values=NO_TOKEN), taken
    return _decode_steps(params, state, steps, static, width)


def _decode_steps(params, state: EngineState, steps: jax.Array, static: Static,
                  width: int) -> tuple[EngineState, jax.Array, jax.Array]:
    """Up to `steps` decode steps of every row while one runs: (state, tokens [batch, width], steps taken)."""
    batch = state.token.shape[0]
    out = jnp.full((batch, width), NO_TOKEN, jnp.int32)

    def running(carry):
        i, s, _ = carry
        return (i < steps) & ~jnp.all(s.done)

    def step(carry):
        i, s, out = carry
        logits, cache = decode_logits(params, s.token, s.cache, static.config, static.compute_dtype)
        s = s._replace(cache=cache)
        token = sampling.sample_rows(logits, s.seen, s.rows, s.keys, s.count, static.sampler.vocab_limit)
        s, column = _record(s, token)
        return i + 1, s, jax.lax.dynamic_update_slice_in_dim(out, column[:, None], i, axis=1)

    taken, state, out = jax.lax.while_loop(running, step, (jnp.zeros((), jnp.int32), state, out))
    return state, out, taken


init_state = jax.jit(_init_state, static_argnames=("static", "batch", "slots", "max_stop_ids"))
fresh_cache = jax.jit(_fresh_cache, static_argnames=("static", "bucket"))
prefill_part = jax.jit(_prefill_part, static_argnames=("static",), donate_argnames=("cache",))
admit = jax.jit(_admit, static_argnames=("static",), donate_argnames=("state",))
roll_slots = jax.jit(_roll_slots, donate_argnums=(0,))
shifted_starts = jax.jit(_shifted_starts)
move_row = jax.jit(_move_row, donate_argnames=("state",))
decode_block = jax.jit(_decode_block, static_argnames=("static", "width", "rows"), donate_argnames=("state",))


# --------------------------------------------------------------------------- host side


@dataclasses.dataclass
class _Prefill:
    """A request being prefilled, chunk by chunk."""

    handle: Handle
    tokens: np.ndarray  # [1, bucket] int32, left-padded
    chunk: int  # tokens per call (the bucket when it fits one chunk)
    next_at: int  # the next slot to feed
    cache: Any = None
    logits: Any = None

    @property
    def bucket(self) -> int:
        return self.tokens.shape[1]

    @property
    def complete(self) -> bool:
        return self.next_at >= self.bucket


class Engine:
    """Continuous batching over `max_batch` slots; see the module docstring.

    model: what `bluelm_jax.load` returns (.config, .params, .tokenizer, .compute_dtype and
    optionally .mesh: the engine's thread then runs under it, rows over `data`).
    max_len: KV cache slots per row (default: the model's context). prefill_chunk: prompt
    tokens fed per call for long prompts (a power of two >= 32). steps_per_sync: decode steps
    per host round trip. max_stop_ids: the most stop ids one request may have.
    kv_cache_dtype: None (or "auto") for a cache in the compute dtype, "int8" for an int8 cache
    with a scale per slot and head (decode.kv_cache_dtype_name).
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_len: Optional[int] = None,
                 prefill_chunk: int = 512, steps_per_sync: int = 4, max_stop_ids: int = 16,
                 kv_cache_dtype: Optional[str] = None):
        config = model.config
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                 ("steps_per_sync", steps_per_sync, 1), ("max_stop_ids", max_stop_ids, 1)):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if prefill_chunk not in PROMPT_BUCKETS:
            raise ValueError(f"prefill_chunk must be one of {PROMPT_BUCKETS}, got {prefill_chunk!r}")
        kv_cache_dtype = kv_cache_dtype_name(kv_cache_dtype)
        max_len = config.context_length if max_len is None else max_len
        if not _is_int(max_len) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
        self.model, self.config = model, config
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.context = min(int(max_len), config.context_length)  # most prompt + new tokens of a request
        self.slots = self.context
        self.prefill_chunk, self.steps_per_sync, self.max_stop_ids = prefill_chunk, steps_per_sync, max_stop_ids
        tok = tokenizer_of(model)
        vocab_limit = min(config.vocab_size, tok.vocab_size) if tok is not None else config.vocab_size
        self._static = Static(config=config, sampler=sampling.SamplerSettings(vocab_limit=vocab_limit),
                              compute_dtype=getattr(model, "compute_dtype", jnp.float32),
                              pad_id=int(config.pad_token_id), kv_cache_dtype=kv_cache_dtype)
        self._mesh = getattr(model, "mesh", None)

        self._lock = threading.Condition()
        self._queue: collections.deque[Handle] = collections.deque()
        self._closing = False
        self._failed: Optional[BaseException] = None
        self._tokens_generated = 0
        self._finished: collections.Counter = collections.Counter()
        # device-loop state (only the loop thread touches these)
        self._rows: list[Optional[Handle]] = [None] * self.max_batch
        self._start = np.zeros(self.max_batch, np.int64)  # host copy of cache.start of running rows
        self._index = 0  # host copy of cache.index
        self._prefill: Optional[_Prefill] = None
        self._active = 0
        self.shifts = 0  # how many times the rows were moved along the cache (`_shift`)
        self.moves = 0  # how many running rows were moved into a free row before them (`_compact`)
        self.blocks = collections.Counter()  # decode blocks run, by width
        self._release = np.zeros(self.max_batch, bool)  # freed rows to end on the device at the next block
        self._first: list[tuple[int, Handle, jax.Array]] = []  # admitted rows' first tokens, not yet read
        # a decode block runs the first `rows` rows, the smallest of these that holds the running ones
        self.widths = tuple(sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length())}))
        self._jobs: collections.deque = collections.deque()  # (function, done event, outcome) for the loop thread
        with sharding.use(self._mesh):
            self._state = init_state(static=self._static, batch=self.max_batch, slots=self.slots,
                                     max_stop_ids=self.max_stop_ids)
        self._thread = threading.Thread(target=self._run, name="bluelm-engine", daemon=True)
        self._thread.start()

    # ---- public

    def submit(self, request: EngineRequest) -> Handle:
        """Queues a request; never waits for the device. ContextOverflowError when the prompt
        and max_new_tokens do not fit, QueueFullError when `max_queue` requests wait."""
        if not isinstance(request, EngineRequest):
            raise TypeError(f"submit takes an EngineRequest, got {type(request).__name__}")
        n, vocab = len(request.prompt_ids), self.config.vocab_size
        if n + request.max_new_tokens > self.context:
            raise ContextOverflowError(
                f"the prompt has {n} tokens and max_new_tokens is {request.max_new_tokens}: {n + request.max_new_tokens}"
                f" tokens do not fit the context of {self.context} tokens")
        bad = [i for i in request.prompt_ids + request.stop_ids if i >= vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(request.stop_ids) > self.max_stop_ids:
            raise ValueError(f"a request may have at most {self.max_stop_ids} stop ids, got {len(request.stop_ids)}")
        handle = Handle(self, request)
        with self._lock:
            if self._failed is not None:
                raise RuntimeError(f"the engine failed: {self._failed}")
            if self._closing:
                raise RuntimeError("the engine is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests wait for a slot)")
            self._queue.append(handle)
            self._lock.notify_all()
        return handle

    def warm_up(self, prompt_lengths=(1,)) -> None:
        """Compiles the engine's functions for prompts of these lengths (their buckets), by
        running one short greedy and one sampled request each, and the decode block for every
        width (`widths`); the stats do not count them."""
        with self._lock:
            tokens, finished = self._tokens_generated, collections.Counter(self._finished)
        for n in prompt_lengths:
            new = min(2, self.context - n)
            if n < 1 or new < 1:
                raise ValueError(f"a warm-up prompt of {n} tokens does not fit the context of {self.context} tokens")
            for temperature in (0.0, 1.0):
                self.submit(EngineRequest(prompt_ids=(self._static.pad_id,) * n, max_new_tokens=new,
                                          temperature=temperature)).result()
        self._on_loop(self._compile_decode_blocks)
        with self._lock:
            self._tokens_generated, self._finished = tokens, finished

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(active_slots=self._active, queue_depth=len(self._queue), max_batch=self.max_batch,
                               max_queue=self.max_queue, tokens_generated=self._tokens_generated,
                               finished=dict(self._finished), compiles=compile_count())

    @property
    def failure(self) -> Optional[str]:
        """Why the engine takes no requests: its device loop's error, or that it is closed; None while it runs."""
        with self._lock:
            if self._failed is not None:
                return f"the engine failed: {type(self._failed).__name__}: {self._failed}"
            return "the engine is closed" if self._closing else None

    def close(self) -> None:
        """Stops the device loop; requests still running or waiting end as "cancelled"."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _on_loop(self, function) -> None:
        """Runs function() on the device loop's thread between two iterations and waits for it."""
        job = (function, threading.Event(), {})
        with self._lock:
            if self._failed is not None or self._closing:
                raise RuntimeError(self.failure)
            self._jobs.append(job)
            self._lock.notify_all()
        job[1].wait()
        if "error" in job[2]:
            raise RuntimeError(f"the engine failed: {job[2]['error']}") from job[2]["error"]

    def _compile_decode_blocks(self) -> None:
        """Compiles the decode block for every width and the row move; changes nothing (no step
        taken, a row moved onto itself)."""
        for rows in self.widths:
            self._state, _, _ = decode_block(self.model.params, self._state, np.int32(0),
                                             np.zeros(self.max_batch, bool), static=self._static,
                                             width=self.steps_per_sync, rows=rows)
        self._state = move_row(self._state, np.int32(0), np.int32(0))

    # ---- the device loop (the engine's thread)

    def _run(self) -> None:
        try:
            with sharding.use(self._mesh):
                while self._wait_for_work():
                    self._iteration()
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
            with self._lock:
                self._failed = e
            self._end_all("cancelled", error=e)
            raise
        self._end_all("cancelled")

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not self._closing:
                if self._active or self._prefill is not None or self._queue or self._jobs:
                    return True
                self._lock.wait()
            return False

    def _iteration(self) -> None:
        """Jobs, admissions (at most one prefill chunk's worth while rows run), then one decode block."""
        self._run_jobs()
        self._drop_released_from_queue()
        self._prefill_some()
        self._release_rows()
        if self._active:
            self._decode()

    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    return
                function, done, outcome = self._jobs.popleft()
            try:
                function()
            except BaseException as e:  # the caller hears of it; the loop fails as for any device error
                outcome["error"] = e
                raise
            finally:
                done.set()

    def _drop_released_from_queue(self) -> None:
        with self._lock:
            dropped = [h for h in self._queue if h._release is not None]
            for h in dropped:
                self._queue.remove(h)
        for h in dropped:
            self._finish(h, h._release)

    def _free_row(self) -> Optional[int]:
        for b, h in enumerate(self._rows):
            if h is None:
                return b
        return None

    def _prefill_some(self) -> None:
        """Prefills queued requests into free rows: while rows run, about one chunk of tokens
        per call; with none running, until the rows or the queue are exhausted."""
        budget = self.prefill_chunk
        while self._free_row() is not None:
            if self._prefill is None:
                with self._lock:
                    if not self._queue:
                        return
                    self._prefill = self._start_prefill(self._queue[0])
                    self._queue.popleft()
            p = self._prefill
            if p.handle._release is not None:
                self._prefill = None
                self._finish(p.handle, p.handle._release)
                continue
            if self._active and budget <= 0:
                return
            self._feed_chunk(p)
            budget -= p.chunk
            if p.complete:
                self._admit(p)
                self._prefill = None

    def _start_prefill(self, handle: Handle) -> _Prefill:
        ids = handle.request.prompt_ids
        bucket = bucket_length(len(ids))
        tokens = np.full((1, bucket), self._static.pad_id, np.int32)
        tokens[0, bucket - len(ids):] = ids
        chunk = bucket if bucket <= self.prefill_chunk else self.prefill_chunk
        start = bucket - len(ids)
        first = (start // chunk) * chunk  # chunks wholly in the padding are skipped
        cache = fresh_cache(np.asarray([start], np.int32), np.int32(first), static=self._static, bucket=bucket)
        return _Prefill(handle, tokens, chunk, first, cache)

    def _feed_chunk(self, p: _Prefill) -> None:
        part = p.tokens[:, p.next_at: p.next_at + p.chunk]
        p.logits, p.cache = prefill_part(self.model.params, p.cache, part, static=self._static)
        p.next_at += p.chunk

    def _admit(self, p: _Prefill) -> None:
        row = self._free_row()
        length = len(p.handle.request.prompt_ids)
        width = min(p.bucket, self.slots)
        if self._index < width:
            self._shift(width - self._index)
        req = p.handle.request
        stop = np.full((self.max_stop_ids,), -1, np.int32)
        stop[: len(req.stop_ids)] = req.stop_ids
        new = RowInput(temperature=np.float32(req.temperature if req.do_sample else 1.0),
                       top_p=np.float32(req.top_p), repetition_penalty=np.float32(req.repetition_penalty),
                       do_sample=np.bool_(req.do_sample), top_k=np.int32(req.top_k),
                       limit=np.int32(req.max_new_tokens), stop_ids=stop,
                       key=np.asarray(sampling.row_keys(req.seed, 1))[0])
        self._state, first = admit(self._state, np.int32(row), p.cache, p.logits, p.tokens, np.int32(length), new,
                                   static=self._static)
        self._rows[row], self._prefill = p.handle, None
        self._release[row] = False  # `admit` set the row's done flag itself
        self._start[row] = self._index - length
        with self._lock:
            self._active += 1
        self._first.append((row, p.handle, first))  # read with the next decode block: no wait here

    def _shift(self, delta: int) -> None:
        free = np.asarray([h is None for h in self._rows])
        cache, by = self._state.cache, np.int32(delta)
        buffers = [tuple(roll_slots(x, by) for x in layers) for layers in _buffers(cache)]
        index, start = shifted_starts(cache.index, cache.start, by, free)
        self._state = self._state._replace(cache=_with_buffers(cache, buffers)._replace(index=index, start=start))
        self._index += delta
        self._start += delta
        self.shifts += 1

    def _release_rows(self) -> None:
        """Frees the rows whose caller cancelled or stopped (the device ends them at the next block)."""
        for b, h in enumerate(self._rows):
            if h is not None and h._release is not None:
                self._release[b] = True
                self._deliver(b, [], h._release)

    def _decode(self) -> None:
        if self._index + self.steps_per_sync > self.slots:  # make room: drop the slots before every start
            running = [b for b, h in enumerate(self._rows) if h is not None]
            low = int(min(self._start[b] for b in running)) if running else self._index
            if low > 0:
                self._shift(-low)
        steps = min(self.steps_per_sync, self.slots - self._index)
        assert steps > 0, "a running row always leaves a free slot at the end of the cache"
        rows = self._compact()
        self._state, out, taken = decode_block(self.model.params, self._state, np.int32(steps), self._release,
                                               static=self._static, width=self.steps_per_sync, rows=rows)
        self._release = np.zeros(self.max_batch, bool)
        firsts, self._first = self._first, []
        for row, handle, first in firsts:  # (token, done, reason); a done row is ended below
            if self._rows[row] is handle:
                self._deliver(row, [int(sharding.to_host(first)[0])], None)
        out, taken, done, reason = (sharding.to_host(x) for x in (out, taken, self._state.done, self._state.reason))
        self._index += int(taken)  # fewer than `steps` when every row ended
        for b, h in enumerate(self._rows):
            if h is None:
                continue
            ids = [int(t) for t in out[b] if t != NO_TOKEN]
            self._deliver(b, ids, FINISH_REASONS[int(reason[b])] if done[b] else None)

    def _compact(self) -> int:
        """Moves the last running rows into the free rows before them, so that the running rows are
        the first ones; returns the decode block's width: the smallest of `widths` that holds them."""
        while True:
            free = self._free_row()
            top = max((b for b, h in enumerate(self._rows) if h is not None), default=-1)
            if free is None or top < free:
                break
            self._state = move_row(self._state, np.int32(top), np.int32(free))
            self.moves += 1
            self._rows[free], self._rows[top] = self._rows[top], None
            self._start[free], self._release[free], self._release[top] = self._start[top], self._release[top], False
            self._first = [(free if row == top else row, handle, first) for row, handle, first in self._first]
        running = sum(h is not None for h in self._rows)
        width = next(w for w in self.widths if w >= running)
        self.blocks[width] += 1
        return width

    def _deliver(self, row: int, ids: list[int], finish_reason: Optional[str]) -> None:
        """Hands ids to row's handle; a finished row is freed."""
        handle = self._rows[row]
        with self._lock:
            self._tokens_generated += len(ids)
        if finish_reason is None:
            handle._push(ids)
            return
        self._rows[row] = None
        with self._lock:
            self._active -= 1
        self._finish(handle, finish_reason, ids)

    def _finish(self, handle: Handle, reason: str, ids: Optional[list[int]] = None,
                error: Optional[BaseException] = None) -> None:
        with self._lock:
            self._finished[reason] += 1
        handle._push(ids or [], reason, error)

    def _end_all(self, reason: str, error: Optional[BaseException] = None) -> None:
        with self._lock:
            waiting = list(self._queue)
            self._queue.clear()
        running = [h for h in self._rows if h is not None]
        if self._prefill is not None:
            running.append(self._prefill.handle)
        self._rows = [None] * self.max_batch
        self._prefill = None
        with self._lock:
            self._active = 0
            jobs = list(self._jobs)
            self._jobs.clear()
        for h in waiting + running:
            self._finish(h, reason, error=error)
        for _, done, outcome in jobs:
            outcome["error"] = error or RuntimeError("the engine is closed")
            done.set()
