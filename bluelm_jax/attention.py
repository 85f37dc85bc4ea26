"""Attention over a query block and a key/value window, with grouped KV heads.

Keys and values are [batch, kv_heads, slots, head_dim] (heads before slots: the layout of
the KV cache, in which a decode step's products read each head's keys as one contiguous
block). Every implementation here computes the same thing: the query at row t sits at cache slot
`q_offset + t` and sees the keys at slots s with `start[b] <= s <= q_offset + t`
(causal, with row b's left padding before `start[b]` invisible). Scores and softmax are
float32.

An int8 cache (`quantize_kv`) holds keys and values as int8 with a float32 scale per slot and
head: x = x_int8 * scale. The dense and chunked kernels read it as it is: the key scale
multiplies the scores after the q.k product, the value scale the probabilities before the
p.v product (exact algebra: sum_d q_d k_sd s_s = s_s (q . k_s); sum_s p_s v_sd s_s =
sum_s (p_s s_s) v_sd), so nothing but the block being read is converted.

    dot_product_attention   dense: builds the [seq, slots] scores (short inputs only)
    chunked_attention       flash-style online softmax over key blocks; never builds
                            [seq, slots]; visits only the key blocks a query block can
                            see (causal skipping; for decode, only the filled part of
                            the cache: the loop stops at block (q_offset + seq) / block_k)
    attention               the dispatcher the model calls: dense for small inputs,
                            otherwise the platform kernel for a fresh prefill (cuDNN on
                            GPU, the Pallas flash kernel on TPU) or the chunked one.

The mask is built from slot indices, never from a [T, T] table of positions.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

# Above this many scores per (batch row, head), `attention` stops building dense scores.
CHUNKED_THRESHOLD = 1 << 20  # e.g. 1,024 queries x 1,024 slots
# With a cache longer than this, even decode goes chunked: it then reads only the filled blocks.
DENSE_MAX_CACHE_SLOTS = 1024
BLOCK_Q = 512  # queries per block of the chunked kernel
BLOCK_K = 512  # keys per block of the chunked kernel
IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn", "pallas")
_NEG = -1e30  # "minus infinity" that keeps exp() and max() finite

Offset = Union[int, jax.Array]
INT8_MAX = 127.0


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of keys or values x [batch, kv_heads, seq, head_dim], one scale per slot and head.

    Returns (int8 [batch, kv_heads, seq, head_dim], scale [batch, kv_heads, seq] float32) with
    scale = max |x| / 127 over head_dim (0 for an all-zero row, whose values are 0), so that
    x ~= int8 * scale with an error of at most scale / 2 per element.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX  # [batch, kv_heads, seq]
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    q = jnp.clip(jnp.round(x / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """int8 x [batch, kv_heads, slots, head_dim] times scale [batch, kv_heads, slots], in dtype."""
    return (x.astype(jnp.float32) * scale[..., None]).astype(dtype)


def query_starts(start: jax.Array, seq: int) -> jax.Array:
    """start as [batch, seq]: the first visible slot of each query (a [batch] start is every query's)."""
    start = jnp.asarray(start, jnp.int32)
    return jnp.broadcast_to(start[:, None], (start.shape[0], seq)) if start.ndim == 1 else start


def attention_mask(query_slots: jax.Array, num_slots: int, start: jax.Array) -> jax.Array:
    """[batch, seq, num_slots] bool: slot s is visible to a query at slot q iff start <= s <= q.

    query_slots: [seq] int32, start: [batch] or [batch, seq] int32 (per row, or per query)
    """
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    causal = slots[None, :] <= query_slots[:, None]  # [seq, num_slots]
    after_start = slots[None, None, :] >= query_starts(start, query_slots.shape[0])[:, :, None]
    return causal[None, :, :] & after_start  # [batch, seq, num_slots]


def _per_slot(scale: Optional[jax.Array]) -> Optional[jax.Array]:
    """A [batch, kv_heads, slots] scale as [batch, kv_heads, 1, 1, slots], to multiply scores or
    probabilities [batch, kv_heads, group, seq, slots]; None stays None."""
    return None if scale is None else scale[:, :, None, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          k_scale: Optional[jax.Array] = None, v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Softmax attention with grouped KV heads; scores and softmax in float32.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, slots, head_dim] in q's dtype, or
    int8 with k_scale, v_scale [batch, kv_heads, slots] float32 (an int8 cache);
    mask: [batch, seq, slots] bool. Returns [batch, seq, heads, head_dim] in q's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [batch, seq, kv_heads, group, head_dim]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    if k_scale is not None:
        scores = scores * _per_slot(k_scale)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [batch, kv_heads, group, seq, slots] float32
    if v_scale is not None:
        probs = probs * _per_slot(v_scale)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(q.dtype), v.astype(q.dtype))
    return out.reshape(b, t, h, d)


# --------------------------------------------------------------------------- chunked


def _cdiv(a, b):
    return (a + b - 1) // b


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: Offset, start: jax.Array,
                      block_q: int = BLOCK_Q, block_k: int = BLOCK_K, k_scale: Optional[jax.Array] = None,
                      v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Causal attention by online softmax over key blocks; the same result as the dense one.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, slots, head_dim], or int8 with
    k_scale, v_scale [batch, kv_heads, slots] float32 (an int8 cache: each key block is
    converted to q's dtype unscaled, its scales applied to the block's scores and probabilities);
    q_offset: slot of the first query (a Python int, or a traced int32 scalar such as a
    cache index); start: [batch] int32 first visible slot of each row, or [batch, seq] of each query.
    Returns [batch, seq, heads, head_dim] in q's dtype. Rows whose queries see no key at
    all (left padding) come out as zeros.

    Peak extra memory is one [batch, heads, block_q, block_k] score block. Each query block
    visits key blocks (its queries' least start) / block_k .. (its last slot) / block_k only. With a static
    q_offset (no cache: training, fresh prefill) the key loop is a scan of `lax.cond`s, so
    the function can be differentiated (each query block is rematerialised); with a traced
    q_offset (a cache) it is a `while_loop` whose trip count is the filled part of the cache.
    """
    b, t, h, d = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    g = h // kv_heads
    bq, bk = min(block_q, t), min(block_k, slots)
    nq, nk = _cdiv(t, bq), _cdiv(slots, bk)
    scale = 1.0 / math.sqrt(d)
    static = isinstance(q_offset, int)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    start = query_starts(start, t)  # [batch, seq]

    q = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    q = q.reshape(b, nq, bq, kv_heads, g, d).swapaxes(0, 1)  # [nq, batch, bq, kv_heads, group, head_dim]
    start = jnp.pad(start, ((0, 0), (0, nq * bq - t)), mode="edge")  # padding queries copy the last one's
    start = start.reshape(b, nq, bq).swapaxes(0, 1)  # [nq, batch, bq]

    def query_block(qi, qb, start):  # qb: [batch, bq, kv_heads, group, head_dim], start: [batch, bq]
        q_slots = q_offset + qi * bq + jnp.arange(bq, dtype=jnp.int32)  # [bq]
        end_block = (q_offset + jnp.minimum((qi + 1) * bq, t) - 1) // bk + 1  # key blocks this block sees
        begin_block = jnp.min(start) // bk  # key blocks wholly before all its queries' starts are skipped

        def visit(kb, carry):
            m, l, acc = carry  # [batch, kv_heads, group, bq] x2, [batch, kv_heads, group, bq, head_dim]
            lo = kb * bk
            at = jnp.minimum(lo, slots - bk)  # the last block is shifted back to stay in bounds ...
            kblk, vblk = _key_block(k, at, bk, qb.dtype), _key_block(v, at, bk, qb.dtype)
            k_sblk, v_sblk = (None if x is None else _key_block(x, at, bk, jnp.float32) for x in (k_scale, v_scale))
            k_slots = at + jnp.arange(bk, dtype=jnp.int32)  # [bk]
            visible = ((k_slots[None, None, :] <= q_slots[None, :, None])
                       & (k_slots[None, None, :] >= start[:, :, None])
                       & (k_slots >= lo)[None, None, :])  # ... and slots before `lo` masked: [batch, bq, bk]
            visible = visible[:, None, None]  # [batch, 1, 1, bq, bk]
            s = jnp.einsum("bqkgd,bksd->bkgqs", qb, kblk, preferred_element_type=jnp.float32) * scale
            if k_sblk is not None:
                s = s * _per_slot(k_sblk)
            s = jnp.where(visible, s, _NEG)  # [batch, kv_heads, group, bq, bk]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            weights = p.astype(v.dtype) if v_sblk is None else (p * _per_slot(v_sblk)).astype(qb.dtype)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", weights, vblk, preferred_element_type=jnp.float32)
            return m_new, l, acc * correction[..., None] + pv

        m = jnp.full((b, kv_heads, g, bq), _NEG, jnp.float32)
        init = (m, jnp.zeros_like(m), jnp.zeros((b, kv_heads, g, bq, d), jnp.float32))
        if static:
            def step(carry, kb):
                needed = (kb >= begin_block) & (kb < end_block)
                return jax.lax.cond(needed, lambda c: visit(kb, c), lambda c: c, carry), None

            (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(nk, dtype=jnp.int32))
        else:
            m, l, acc = jax.lax.fori_loop(begin_block, end_block, visit, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [batch, kv_heads, group, bq, head_dim]
        return out.transpose(0, 3, 1, 2, 4).astype(qb.dtype)  # [batch, bq, kv_heads, group, head_dim]

    if static:
        query_block = jax.checkpoint(query_block)
    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(nq, dtype=jnp.int32), q, start))
    out = out.swapaxes(0, 1).reshape(b, nq * bq, h, d)  # [batch, nq * bq, heads, head_dim]
    return out[:, :t]


def _key_block(x: jax.Array, at: jax.Array, size: int, dtype) -> jax.Array:
    """Slots [at, at + size) of x [batch, kv_heads, slots, ...] (keys, values or their scales), in dtype."""
    return jax.lax.dynamic_slice_in_dim(x, at, size, axis=2).astype(dtype)


# --------------------------------------------------------------------------- platform kernels


def _left_to_right_padding(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Rolls each row of x [batch, seq, ...] left by shift[b] (left padding -> right padding)."""
    t = x.shape[1]
    index = (jnp.arange(t, dtype=jnp.int32)[None, :] + shift[:, None]) % t  # [batch, seq]
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> jax.Array:
    """Fresh causal prefill (query t at slot t, keys = the same tokens) with cuDNN flash attention.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, seq, head_dim]; start [batch].
    cuDNN masks right padding only, so each row is rolled left by start[b], attended with
    sequence lengths seq - start[b], and rolled back. Needs bfloat16/float16 inputs.
    """
    t = q.shape[1]
    lengths = (t - start).astype(jnp.int32)
    k, v = (x.swapaxes(1, 2) for x in (k, v))  # [batch, seq, kv_heads, head_dim], as cuDNN takes them
    q, k, v = (_left_to_right_padding(x, start) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="cudnn")
    valid = jnp.arange(t)[None, :] < lengths[:, None]  # [batch, seq]
    out = jnp.where(valid[:, :, None, None], out, 0)
    return _left_to_right_padding(out, (t - start) % t)


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> jax.Array:
    """Fresh causal prefill with the Pallas TPU flash kernel; padding masked by segment ids.

    Shapes as in `cudnn_attention`. Grouped KV heads are repeated to the query heads.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, h, d = q.shape
    group = h // k.shape[1]
    k, v = (jnp.repeat(x, group, axis=1) for x in (k, v))  # [batch, heads, seq, head_dim]
    segment = (jnp.arange(t, dtype=jnp.int32)[None, :] >= start[:, None]).astype(jnp.int32)  # [batch, seq]
    q = q.transpose(0, 2, 1, 3)  # [batch, heads, seq, head_dim]
    blocks = min(512, t)
    sizes = fa.BlockSizes(block_q=blocks, block_k_major=blocks, block_k=blocks, block_b=1)
    out = fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(segment, segment), causal=True,
                             sm_scale=1.0 / math.sqrt(d), block_sizes=sizes)
    out = jnp.where(segment[:, None, :, None] > 0, out, 0)
    return out.transpose(0, 2, 1, 3)


def platform_kernel(backend: str, dtype, seq: int, head_dim: int):
    """The fused prefill kernel for this platform and shape, or None (then chunked is used)."""
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and low_precision and head_dim % 8 == 0 and head_dim <= 256:
        return cudnn_attention
    if backend == "tpu" and seq % 128 == 0 and head_dim % 128 == 0:
        try:
            from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
        except ImportError:
            return None
        return pallas_tpu_attention
    return None


# --------------------------------------------------------------------------- dispatch


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: Offset, start: jax.Array,
              implementation: str = "auto", k_scale: Optional[jax.Array] = None,
              v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Causal attention of queries at slots q_offset + t over keys at slots start[b] .. q_offset + t.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_heads, slots, head_dim] (slots = seq
    without a cache, the cache length with one), or an int8 cache's int8 k, v with their
    k_scale, v_scale [batch, kv_heads, slots]; q_offset: 0 (Python int) without a cache,
    the traced cache index with one; start: [batch] int32, or [batch, seq] (each query's own
    first slot: packed rows, several sequences one after another, each query seeing only its own).
    implementation "auto": dense scores when seq * slots <= CHUNKED_THRESHOLD (and, with a
    cache, slots <= DENSE_MAX_CACHE_SLOTS: a long cache is read only up to its filled part); otherwise,
    for a prefill, the platform kernel (cuDNN / Pallas TPU) on a fresh sequence (q_offset
    == 0; with a cache this is decided at run time by `lax.cond`; never for a [batch, seq] start),
    else `chunked_attention`. "dense", "chunked", "cudnn", "pallas" force one (the last two need a
    fresh prefill and a [batch] start).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r} (known: {', '.join(IMPLEMENTATIONS)})")
    seq, slots = q.shape[1], k.shape[2]
    with_cache = not isinstance(q_offset, int)
    per_query = jnp.ndim(start) == 2
    if per_query and implementation in ("cudnn", "pallas"):
        raise ValueError(f"the {implementation} kernel takes one start per row, not one per query")
    if implementation == "auto":
        long_cache = with_cache and slots > DENSE_MAX_CACHE_SLOTS
        kernel = platform_kernel(jax.default_backend(), q.dtype, seq, q.shape[-1]) if seq > 1 and not per_query else None
        if seq * slots <= CHUNKED_THRESHOLD and not long_cache:
            implementation = "dense"
        elif kernel is not None:
            implementation = "cudnn" if kernel is cudnn_attention else "pallas"
        else:
            implementation = "chunked"
    chunked = functools.partial(chunked_attention, q, k, v, q_offset, start, k_scale=k_scale, v_scale=v_scale)
    if implementation == "chunked":
        return chunked()
    if implementation == "dense":
        mask = attention_mask(q_offset + jnp.arange(seq, dtype=jnp.int32), slots, start)  # [batch, seq, slots]
        return dot_product_attention(q, k, v, mask, k_scale, v_scale)

    # a platform kernel: it runs a fresh causal prefill (q_offset == 0) over the new tokens' keys
    kernel = cudnn_attention if implementation == "cudnn" else pallas_tpu_attention
    k_new, v_new = (_first_slots(x, scale, seq, q.dtype)
                    for x, scale in ((k, k_scale), (v, v_scale)))  # [batch, kv_heads, seq, head_dim]
    if not with_cache:
        return kernel(q, k_new, v_new, start) if q_offset == 0 else chunked()
    return jax.lax.cond(q_offset == 0, lambda: kernel(q, k_new, v_new, start), chunked)


def _first_slots(x: jax.Array, scale: Optional[jax.Array], seq: int, dtype) -> jax.Array:
    """Slots [0, seq) of keys or values x [batch, kv_heads, slots, head_dim] in dtype (an int8
    cache's dequantized with its scale [batch, kv_heads, slots]): what a platform kernel reads."""
    if scale is None:
        return x[:, :, :seq].astype(dtype)
    return dequantize_kv(x[:, :, :seq], scale[:, :, :seq], dtype)
