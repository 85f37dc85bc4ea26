"""Attention over a query block and a key/value window, with grouped KV heads.

Scores and softmax are float32. The mask is built from slot indices ([batch, seq, slots]),
never from a [T, T] table of positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(query_slots: jax.Array, num_slots: int, start: jax.Array) -> jax.Array:
    """[batch, seq, num_slots] bool: slot s is visible to a query at slot q iff start <= s <= q.

    query_slots: [seq] int32, start: [batch] int32
    """
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    causal = slots[None, :] <= query_slots[:, None]  # [seq, num_slots]
    after_padding = slots[None, :] >= start[:, None]  # [batch, num_slots]
    return causal[None, :, :] & after_padding[:, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped KV heads; scores and softmax in float32.

    q: [batch, seq, heads, head_dim]; k, v: [batch, slots, kv_heads, head_dim];
    mask: [batch, seq, slots] bool. Returns [batch, seq, heads, head_dim].
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [batch, seq, kv_heads, group, head_dim]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [batch, kv_heads, group, seq, slots]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
