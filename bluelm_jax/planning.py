"""Request planning: from prompts and generation settings to the padded arrays of one compiled call.

Prompts are tokenized (or taken as ids), LEFT-padded to a length bucket (32, 64, ...), and
the batch is padded to a power of two, so that prompts of different lengths reuse one
compiled program. A row may generate up to `max_new_tokens`, and never past the end of the
model's context (2,048 or 32,768 positions): the output buffer and the cache tail hold only
what the context allows. A prompt that does not fit the context at all raises
`ContextOverflowError`. Nothing is truncated silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from bluelm_jax import sampling
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.decode import Request, Static, kv_cache_dtype_name

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
NEW_TOKENS_QUANTUM = 32  # the output buffer (and cache tail) is rounded up to this
STOP_ID_SLOTS = 8  # the stop-id array is padded to a multiple of this (fewer shapes)
HUMAN_PIECE = "[|Human|]:"

Prompt = Union[str, Sequence[int], Sequence[dict]]
Seed = Union[int, None, Sequence[Optional[int]]]
Stop = Union[None, str, int, Sequence[Union[str, int]]]


class ContextOverflowError(ValueError):
    """A prompt does not fit the model's context window."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to generate: the one declaration of `generate`'s and `stream`'s options.

    temperature 0 is greedy decoding; top_p, top_k (0: off) and repetition_penalty (1: off)
    have Hugging Face semantics. seed: an int for every row, one per prompt, or None for a
    random one. stop: strings and/or token ids that end a row. chat: a string prompt is one
    user turn of the chat template, and generation also stops at `[|Human|]:`.
    kv_cache_dtype: None (or "auto") keeps the KV cache in the compute dtype; "int8" stores it
    as int8 with a scale per slot and head (half the memory of bfloat16, logits within a small
    tolerance).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Seed = 0
    stop: Stop = None
    chat: bool = False
    add_bos: bool = True
    kv_cache_dtype: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "kv_cache_dtype", kv_cache_dtype_name(self.kv_cache_dtype))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        temperature = np.asarray(self.temperature, np.float64)
        if temperature.ndim > 0:
            raise ValueError("temperature must be one number")
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        for name in ("seed", "stop"):  # lists become tuples: the settings stay immutable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def do_sample(self) -> bool:
        return float(self.temperature) > 0

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass
class Plan:
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
    keys: np.ndarray


def bucket_length(n: int) -> int:
    """Smallest prompt bucket holding n tokens."""
    for b in PROMPT_BUCKETS:
        if n <= b:
            return b
    return -(-n // PROMPT_BUCKETS[-1]) * PROMPT_BUCKETS[-1]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tokenizer_of(model) -> Any:
    """The model's tokenizer, or None (then prompts must be token ids)."""
    return getattr(model, "tokenizer", None)


def _is_ids(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and np.issubdtype(x.dtype, np.integer)
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_int(i) for i in x)


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def as_prompt_list(prompts) -> list:
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
    tok = tokenizer_of(model)
    out = []
    for p in as_prompt_list(prompts):
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


def stop_settings(model, stop: Stop, chat: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop ids, stop strings): </s> always, the [|Human|]: piece in chat mode, plus `stop`."""
    tok = tokenizer_of(model)
    if stop is None:
        stop = []
    elif isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    if tok is None and (chat or any(isinstance(s, str) for s in stop)):
        raise ValueError("stop strings and chat mode need a model with a tokenizer")
    ids = {int(model.config.eos_token_id)}
    if tok is not None:
        ids.add(int(tok.eos_id))
    strings: list[str] = []
    if chat:
        if tok is not None:
            ids.update(int(i) for i in tok.chat_stop_ids)
        strings.append(HUMAN_PIECE)  # also when the text spells it out of several pieces
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


def make_plan(model, prompts, settings: GenerationSettings) -> Plan:
    """The padded inputs, shapes, sampling and stop settings of one call for `prompts`."""
    config: BlueLMConfig = model.config
    s = settings
    prompt_ids = encode_prompts(model, prompts, chat=s.chat, add_bos=s.add_bos)
    context = config.context_length
    lengths = [len(p) for p in prompt_ids]
    for i, n in enumerate(lengths):
        if n >= context:
            raise ContextOverflowError(
                f"prompt {i} has {n} tokens; the model's context is {context} tokens, "
                f"leaving no room for new tokens")
    limits = [min(int(s.max_new_tokens), context - n) for n in lengths]  # "length" at the context's end

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

    stop_ids, stop_strings = stop_settings(model, s.stop, s.chat)
    stop_arr = np.full((_round_up(len(stop_ids), STOP_ID_SLOTS),), -1, np.int32)
    stop_arr[: len(stop_ids)] = stop_ids

    tok = tokenizer_of(model)
    vocab_limit = min(config.vocab_size, tok.vocab_size) if tok is not None else config.vocab_size
    sampler = sampling.SamplerSettings(do_sample=s.do_sample, top_k=int(s.top_k), vocab_limit=vocab_limit)
    params = sampling.make_params(padded_batch, temperature=float(s.temperature) if s.do_sample else 1.0,
                                  top_p=s.top_p, repetition_penalty=s.repetition_penalty)
    seed = s.seed
    if isinstance(seed, tuple):
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds for {batch} prompts")
        seed = list(seed) + [0] * (padded_batch - batch)
    keys = np.asarray(sampling.row_keys(seed, padded_batch))
    static = Static(config=config, sampler=sampler, compute_dtype=getattr(model, "compute_dtype", jnp.float32),
                    pad_id=int(pad), kv_cache_dtype=s.kv_cache_dtype)
    # host (numpy) inputs: jit places them, also on a mesh that spans several processes
    request = Request(sampler=sampling.SamplerParams(*(np.asarray(x) for x in params)), limit=limit,
                      stop_ids=stop_arr)
    return Plan(prompt_ids, tokens, start, limit, width, cache_len, stop_ids, stop_strings, static, request, keys)
