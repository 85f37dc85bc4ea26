"""Text generation: bucketed prefill, then a compiled decode loop over a preallocated KV cache.

The way a call runs:

1. Prompts are tokenized (or taken as ids), LEFT-padded to a length bucket (32, 64, ...),
   and the batch is padded to a power of two, so that prompts of different lengths reuse
   one compiled program. Row b's real tokens occupy cache slots start[b] .. bucket-1; its
   positions are `slot - start[b]`.
2. `_prefill` (one jitted call) allocates the cache, runs the whole padded prompt through
   the model, and samples the first token.
3. `_decode_loop` (one jitted `lax.while_loop`, the state donated so the cache is updated
   in place) runs `_decode_step` until every row has stopped or the step budget is spent.
   `stream` calls the same `_decode_step`, jitted alone, once per token from Python,
   dispatching the next step before it reads the current token.

Sampling settings are split as in sampling.py: whether to sample and top-k are static;
temperature, top-p, repetition penalty, seeds, stop ids and per-row token limits are
traced, so changing them never recompiles. `TRACE_COUNTS` counts the traces (compilations)
of each jitted function, for tests.

Stopping: a row stops at `</s>`, at any stop id (in chat mode also the `[|Human|]:` piece),
or when a stop string appears in its text (checked on the host between chunks of steps);
the finish reason is "stop". A row that reaches `max_new_tokens`, or the end of the
model's context (2,048 or 32,768 positions), finishes with "length". A prompt that does
not fit the context at all raises `ContextOverflowError`. Nothing is truncated silently.

Returned ids include the token that stopped a row (as Hugging Face `generate` does);
returned texts exclude the stop token or stop string.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import sampling, sharding
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.model import KVCache, forward, init_cache

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
NEW_TOKENS_QUANTUM = 32  # the output buffer (and cache tail) is rounded up to this
STOP_STRING_CHUNK = 16  # decode steps between host checks for stop strings
STOP_ID_SLOTS = 8  # the stop-id array is padded to a multiple of this (fewer shapes)
HUMAN_PIECE = "[|Human|]:"

RUNNING, STOP, LENGTH = 0, 1, 2
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}

TRACE_COUNTS: collections.Counter = collections.Counter()  # jitted function -> traces

Prompt = Union[str, Sequence[int], Sequence[dict]]


class ContextOverflowError(ValueError):
    """A prompt does not fit the model's context window."""


# --------------------------------------------------------------------------- state


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


@dataclasses.dataclass(frozen=True)
class Static:
    """The hashable, static part of a compiled call."""

    config: BlueLMConfig
    sampler: sampling.SamplerSettings
    compute_dtype: Any
    pad_id: int


# --------------------------------------------------------------------------- pure steps


def prefill_logits(params: dict, tokens: jax.Array, start: jax.Array, cache_len: int, config: BlueLMConfig,
                   compute_dtype=jnp.float32) -> tuple[jax.Array, KVCache]:
    """Fills a new cache of `cache_len` slots with a left-padded prompt.

    tokens: [batch, bucket]; start: [batch] first real slot of each row.
    Returns the next-token logits [batch, vocab] (float32) and the cache (index = bucket).
    """
    batch, bucket = tokens.shape
    cache = init_cache(config, batch, cache_len, dtype=compute_dtype, start=start)
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


def _record(state: DecodeState, token: jax.Array, request: Request) -> DecodeState:
    """Appends the sampled `token` [batch] to the rows still running; updates stop flags."""
    live = ~state.done  # [batch]
    width = state.tokens.shape[1]
    col = jnp.minimum(state.step, width - 1)
    old = jax.lax.dynamic_slice_in_dim(state.tokens, col, 1, axis=1)[:, 0]
    column = jnp.where(live, token, old)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, column[:, None], col, axis=1)
    count = state.count + live.astype(jnp.int32)
    is_stop = live & jnp.any(token[:, None] == request.stop_ids[None, :], axis=-1)
    at_limit = live & ~is_stop & (count >= request.limit)
    reason = jnp.where(is_stop, STOP, jnp.where(at_limit, LENGTH, state.reason))
    return state._replace(
        token=token, tokens=tokens, count=count, step=state.step + 1,
        done=state.done | is_stop | at_limit, reason=reason.astype(jnp.int32),
        seen=sampling.mark_seen(state.seen, token),
    )


def _prefill(params, tokens, start, request: Request, keys, static: Static, cache_len: int,
             width: int) -> DecodeState:
    """Prompt -> cache, and the first generated token. tokens: [batch, bucket]."""
    TRACE_COUNTS["prefill"] += 1
    c = static.config
    logits, cache = prefill_logits(params, tokens, start, cache_len, c, static.compute_dtype)
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


def _decode_step(params, state: DecodeState, request: Request, static: Static) -> DecodeState:
    """Feeds the last token, samples the next: the body of the loop and of `stream`."""
    logits, cache = decode_logits(params, state.token, state.cache, static.config, static.compute_dtype)
    state = state._replace(cache=cache)
    token = sampling.sample(logits, state.seen, request.sampler, state.keys, state.step, static.sampler)
    return _record(state, token, request)


def _decode_loop(params, state: DecodeState, request: Request, until: jax.Array, static: Static) -> DecodeState:
    """Decode steps until every row is done or `until` steps were taken (traced bound)."""
    TRACE_COUNTS["decode_loop"] += 1

    def running(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    return jax.lax.while_loop(running, lambda s: _decode_step(params, s, request, static), state)


def _stream_step(params, state: DecodeState, request: Request, static: Static):
    """One decode step; returns the state and (token, done, reason) to read on the host.

    `stream` dispatches a step before it knows that the previous one finished the row: that
    extra step writes only within the buffers (indices are clamped) and its result is
    dropped. (No `lax.cond` to skip it: a pass-through branch may copy the whole cache.)"""
    TRACE_COUNTS["stream_step"] += 1
    state = _decode_step(params, state, request, static)
    return state, (state.token, state.done, state.reason)


@functools.partial(jax.jit, donate_argnames=("state",))
def _mark_stopped(state: DecodeState, stopped: jax.Array) -> DecodeState:
    """Ends the rows where `stopped` [batch] is set (found a stop string), reason STOP."""
    return state._replace(done=state.done | stopped, reason=jnp.where(stopped, STOP, state.reason))


_prefill_jit = jax.jit(_prefill, static_argnames=("static", "cache_len", "width"))
_decode_loop_jit = jax.jit(_decode_loop, static_argnames=("static",), donate_argnames=("state",))
_stream_step_jit = jax.jit(_stream_step, static_argnames=("static",), donate_argnames=("state",))


# --------------------------------------------------------------------------- host side


@dataclasses.dataclass
class GenerationResult:
    """One entry per prompt. ids include the stop token; texts exclude stop tokens/strings."""

    texts: Optional[list[str]]  # None when the model has no tokenizer
    ids: list[list[int]]
    finish_reasons: list[str]  # "stop" or "length"
    prompt_ids: list[list[int]]


@dataclasses.dataclass
class _Plan:
    """A prepared call: padded inputs, shapes and stop settings."""

    prompt_ids: list[list[int]]
    tokens: np.ndarray  # [batch_padded, bucket] int32
    start: np.ndarray  # [batch_padded] int32
    limit: np.ndarray  # [batch_padded] int32
    width: int
    cache_len: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    static: Static
    request: Request
    keys: jax.Array


def _to_host(tree):
    """numpy values of device arrays (gathered from every process when sharded across hosts)."""
    return jax.tree.map(sharding.to_host, tree)


def bucket_length(n: int) -> int:
    """Smallest prompt bucket holding n tokens."""
    for b in PROMPT_BUCKETS:
        if n <= b:
            return b
    return -(-n // PROMPT_BUCKETS[-1]) * PROMPT_BUCKETS[-1]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tokenizer(model):
    return getattr(model, "tokenizer", None)


def _is_ids(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and np.issubdtype(x.dtype, np.integer)
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in x)


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _as_batch(prompts, chat: bool) -> list:
    """A list of prompts (str, id lists, or message lists) from one prompt or a batch."""
    if isinstance(prompts, str) or _is_ids(prompts) or _is_messages(prompts):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        return [row for row in prompts]
    if isinstance(prompts, (list, tuple)) and prompts:
        return list(prompts)
    raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")


def encode_prompts(model, prompts, chat: bool = False, add_bos: bool = True) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenized (as a one-turn chat if `chat`),
    message lists go through the chat template, id lists are taken as they are."""
    tok = _tokenizer(model)
    out = []
    for p in _as_batch(prompts, chat):
        if _is_ids(p):
            ids = [int(i) for i in p]
        elif isinstance(p, str) or _is_messages(p):
            if tok is None:
                raise ValueError("this model has no tokenizer: give prompts as token ids")
            if _is_messages(p):
                ids = tok.encode_chat(p)
            elif chat:
                ids = tok.encode_chat([{"role": "user", "content": p}])
            else:
                ids = tok.encode(p, add_bos=add_bos)
        else:
            raise ValueError(f"a prompt must be a string, a list of token ids or a list of messages, got {p!r:.60}")
        if not ids:
            raise ValueError("a prompt has no tokens")
        vocab = model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        out.append(ids)
    return out


def _stop_settings(model, stop, chat: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop ids, stop strings): </s> always, the [|Human|]: piece in chat mode, plus `stop`."""
    tok = _tokenizer(model)
    if tok is None and (chat or any(isinstance(s, str) for s in ([stop] if isinstance(stop, str) else stop or []))):
        raise ValueError("stop strings and chat mode need a model with a tokenizer")
    ids = {int(model.config.eos_token_id)}
    if tok is not None:
        ids.add(int(tok.eos_id))
    strings: list[str] = []
    if chat:
        if tok is not None:
            ids.update(int(i) for i in tok.chat_stop_ids)
        strings.append(HUMAN_PIECE)  # also when the text spells it out of several pieces
    if stop is None:
        stop = []
    elif isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    for s in stop:
        if isinstance(s, bool) or not isinstance(s, (str, int, np.integer)):
            raise ValueError(f"a stop must be a string or a token id, got {s!r}")
        if isinstance(s, str):
            if not s:
                raise ValueError("a stop string must not be empty")
            strings.append(s)
        else:
            if not 0 <= int(s) < model.config.vocab_size:
                raise ValueError(f"stop id {s} is outside the vocabulary [0, {model.config.vocab_size})")
            ids.add(int(s))
    return tuple(sorted(ids)), tuple(dict.fromkeys(strings))


def _plan(model, prompts, *, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop,
          chat, add_bos) -> _Plan:
    config: BlueLMConfig = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    temps = np.asarray(temperature, np.float64)
    if temps.ndim > 0:
        raise ValueError("temperature must be one number")
    if not np.isfinite(temps) or temps < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    do_sample = float(temps) > 0

    prompt_ids = encode_prompts(model, prompts, chat=chat, add_bos=add_bos)
    context = config.context_length
    lengths = [len(p) for p in prompt_ids]
    for i, n in enumerate(lengths):
        if n >= context:
            raise ContextOverflowError(
                f"prompt {i} has {n} tokens; the model's context is {context} tokens, "
                f"leaving no room for new tokens")
    limits = [min(int(max_new_tokens), context - n) for n in lengths]  # "length" at the context's end

    batch = len(prompt_ids)
    padded_batch = 1 << (batch - 1).bit_length()
    bucket = bucket_length(max(lengths))
    # the output buffer and the cache tail hold what the context allows, not max_new_tokens
    width = _round_up(max(limits), NEW_TOKENS_QUANTUM)
    cache_len = bucket + width
    pad = config.pad_token_id
    tokens = np.full((padded_batch, bucket), pad, np.int32)
    start = np.full((padded_batch,), bucket - 1, np.int32)  # padding rows: one pad token
    for b, ids in enumerate(prompt_ids):
        tokens[b, bucket - len(ids):] = ids
        start[b] = bucket - len(ids)
    limit = np.zeros((padded_batch,), np.int32)
    limit[:batch] = limits

    stop_ids, stop_strings = _stop_settings(model, stop, chat)
    stop_arr = np.full((_round_up(len(stop_ids), STOP_ID_SLOTS),), -1, np.int32)
    stop_arr[: len(stop_ids)] = stop_ids

    tok = _tokenizer(model)
    vocab_limit = min(config.vocab_size, tok.vocab_size) if tok is not None else config.vocab_size
    settings = sampling.SamplerSettings(do_sample=do_sample, top_k=int(top_k), vocab_limit=vocab_limit)
    params = sampling.make_params(padded_batch, temperature=float(temps) if do_sample else 1.0, top_p=top_p,
                                  repetition_penalty=repetition_penalty)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds for {batch} prompts")
        seed = list(seed) + [0] * (padded_batch - batch)
    keys = sampling.row_keys(seed, padded_batch)
    static = Static(config=config, sampler=settings, compute_dtype=getattr(model, "compute_dtype", jnp.float32),
                    pad_id=int(pad))
    # host (numpy) inputs: jit places them, also on a mesh that spans several processes
    request = Request(sampler=jax.tree.map(np.asarray, params), limit=limit, stop_ids=stop_arr)
    keys = np.asarray(keys)
    return _Plan(prompt_ids, tokens, start, limit, width, cache_len, stop_ids, stop_strings, static, request, keys)


def _prefill_plan(model, plan: _Plan) -> DecodeState:
    return _prefill_jit(model.params, plan.tokens, plan.start, plan.request, plan.keys,
                        static=plan.static, cache_len=plan.cache_len, width=plan.width)


def _text_of(tok, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Decoded text of generated ids without stop-id tokens."""
    return tok.decode([i for i in ids if i not in stop_ids], skip_special_tokens=True)


def _find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def _cut_at_stop_string(tok, ids: list[int], stop_ids, stop_strings) -> Optional[tuple[list[int], str]]:
    """If the text of ids contains a stop string: (the shortest ids prefix whose text holds it,
    the text before the stop string); else None."""
    text = _text_of(tok, ids, stop_ids)
    at = _find_stop(text, stop_strings)
    if at < 0:
        return None
    n = len(ids)
    while n > 1 and _find_stop(_text_of(tok, ids[: n - 1], stop_ids), stop_strings) >= 0:
        n -= 1
    return ids[:n], text[:at]


def generate(model, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, repetition_penalty: float = 1.0, seed=0, stop=None, chat: bool = False,
             add_bos: bool = True) -> GenerationResult:
    """Generates a continuation of each prompt.

    model: an object with `.config`, `.params`, `.tokenizer` (may be None: then prompts must
      be ids and texts are None) and optionally `.compute_dtype` (e.g. from `bluelm_jax.load`).
    prompts: a string, a list of token ids, or a list of either (a batch); with `chat=True`,
      a string is one user turn, and a list of {"role", "content"} dicts a conversation.
    temperature: 0 for greedy decoding; top_p, top_k (0: off), repetition_penalty (1: off)
      have Hugging Face semantics. seed: an int for every row, a list (one per prompt), or
      None for a random one. stop: strings and/or token ids that end a row.
    Returns a GenerationResult (lists, one entry per prompt).
    """
    plan = _plan(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=stop, chat=chat,
                 add_bos=add_bos)
    tok = _tokenizer(model)
    batch = len(plan.prompt_ids)
    state = _prefill_plan(model, plan)
    cut: dict[int, tuple[list[int], str]] = {}  # rows cut at a stop string: (ids, text)
    checked: set[int] = set()
    if not plan.stop_strings or tok is None:
        state = _decode_loop_jit(model.params, state, plan.request, np.int32(plan.width), static=plan.static)
    else:  # stop strings: chunks of steps, the host checks the text in between
        while True:
            tokens, count, done = _to_host((state.tokens, state.count, state.done))
            newly = []
            for b in range(batch):  # rows that ended in this chunk too: the string may come first
                if b not in cut and b not in checked:
                    found = _cut_at_stop_string(tok, tokens[b, : count[b]].tolist(), plan.stop_ids, plan.stop_strings)
                    if found is not None:
                        cut[b] = found
                        newly.append(b)
                    elif done[b]:
                        checked.add(b)  # ended without a stop string: its text is final
            if newly:
                stopped = np.zeros(state.done.shape, bool)
                stopped[newly] = True
                state = _mark_stopped(state, stopped)
            if _to_host(state.done).all() or int(_to_host(state.step)) >= plan.width:
                break
            until = np.int32(min(int(_to_host(state.step)) + STOP_STRING_CHUNK, plan.width))
            state = _decode_loop_jit(model.params, state, plan.request, until, static=plan.static)
    tokens, count, reason = _to_host((state.tokens, state.count, state.reason))

    ids, texts, reasons = [], [], []
    for b in range(batch):
        row = tokens[b, : count[b]].tolist()
        if b in cut:
            row, text = cut[b]
        elif tok is not None:
            text = _text_of(tok, row, plan.stop_ids)
        else:
            text = None
        ids.append(row)
        texts.append(text)
        reasons.append(FINISH_REASONS[int(reason[b])])
    return GenerationResult(texts=texts if tok is not None else None, ids=ids, finish_reasons=reasons,
                            prompt_ids=plan.prompt_ids)


# --------------------------------------------------------------------------- streaming


class TextStream:
    """Iterates over text increments of one generation; afterwards `.text`, `.ids`,
    `.finish_reason` and `.prompt_ids` hold the result. Increments never split a UTF-8
    character, and text that may be the start of a stop string is held back until known."""

    def __init__(self, model, plan: _Plan):
        if _tokenizer(model) is None:
            raise ValueError("streaming text needs a model with a tokenizer")
        self._model, self._plan = model, plan
        self.prompt_ids = plan.prompt_ids[0]
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a TextStream can be iterated only once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[str]:
        model, plan = self._model, self._plan
        detok = Detokenizer(model.tokenizer, plan.stop_ids, plan.stop_strings)
        state = _prefill_plan(model, plan)
        out = _to_host((state.token, state.done, state.reason))  # before the state is donated
        while True:
            # dispatch the next step before reading this one: the device works while we decode text
            state, upcoming = _stream_step_jit(model.params, state, plan.request, static=plan.static)
            token, done, reason = _to_host(out)
            piece = detok.push(int(token[0]), final=bool(done[0]))
            self.ids, self.text = detok.ids, detok.text
            if detok.stopped:
                self.finish_reason = "stop"
            elif done[0]:
                self.finish_reason = FINISH_REASONS[int(reason[0])]
            if piece:
                yield piece
            if self.finish_reason is not None:
                return
            out = upcoming


class Detokenizer:
    """Text increments of a growing list of generated ids.

    An increment never ends inside a UTF-8 character (an incomplete byte-fallback sequence
    decodes to U+FFFD at the end: it is held back), nor in a tail that could begin a stop
    string. Stop-id tokens are left out of the text; when a stop string appears, `ids` and
    `text` are cut at it and `stopped` is set."""

    def __init__(self, tokenizer, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, tuple(stop_ids), tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0  # characters of text already returned

    def push(self, token: int, final: bool = False) -> str:
        """Adds one token; returns the text that can be shown now ("" if none).
        final: no more tokens follow, so everything left is returned."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = _text_of(self.tokenizer, self.ids, self.stop_ids)
        if _find_stop(text, self.stop_strings) >= 0:
            self.ids, text = _cut_at_stop_string(self.tokenizer, self.ids, self.stop_ids, self.stop_strings)
            self.stopped = final = True
        self.text = text
        safe = len(text) if final else _safe_length(text, self.stop_strings)
        if safe <= self._emitted:
            return ""
        piece, self._emitted = text[self._emitted:safe], safe
        return piece


def _safe_length(text: str, stop_strings: Sequence[str]) -> int:
    """How much of `text` can be shown: not an unfinished UTF-8 character (decoded as U+FFFD
    at the end), nor a tail that could begin a stop string."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    safe = n
    for s in stop_strings:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k : n] == s[:k]:
                safe = min(safe, n - k)
                break
    return safe


def stream(model, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
           top_k: int = 0, repetition_penalty: float = 1.0, seed=0, stop=None, chat: bool = False,
           add_bos: bool = True) -> TextStream:
    """Like `generate` for one prompt, but returns a TextStream yielding text as it is produced."""
    if len(_as_batch(prompt, chat)) != 1:
        raise ValueError("stream takes one prompt")
    plan = _plan(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=stop, chat=chat,
                 add_bos=add_bos)
    return TextStream(model, plan)
