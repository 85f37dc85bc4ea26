"""The BlueLM network as a pure function of (params, tokens, positions, cache).

BlueLM is LLaMA plus a LayerNorm on the token embeddings. Layers are stacked on a leading
axis of every per-layer weight (see params.py) and run with `lax.scan`, so the compiled
program has one layer body whatever the depth. Norms, softmax and logits are float32;
matrix products run in `compute_dtype` (float32 on CPU, bfloat16 on GPU/TPU), except that
bfloat16 weights with float32 compute on CPU use a bfloat16 dot with a float32 result
(`_bf16_weight_matmul`) and are never converted to float32.

`params["layers"]` may also be a list of per-layer dicts (`params.unstack_layers`): the
layers are then unrolled, each weight its own buffer. That is the fastest layout for
decoding on CPU, where XLA copies a layer's slice out of a stacked weight at every step.

The KV cache is preallocated: `[layers, batch, max_len, kv_heads, head_dim]`, written in
place with `dynamic_update_slice`. Rows of a batch share one write index: prompts of
different lengths are left-padded, and `start[b]` is the first real slot of row b.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bluelm_jax.attention import attention
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.rope import apply_rope, sin_cos
from bluelm_jax.sharding import constrain


class KVCache(NamedTuple):
    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    index: jax.Array  # [] int32: slots filled so far (the same for every row)
    start: jax.Array  # [batch] int32: first valid slot of each row

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: BlueLMConfig, batch: int, max_len: int, dtype=jnp.float32,
               start: Optional[jax.Array] = None) -> KVCache:
    """An empty cache of `max_len` slots; `start` [batch] marks each row's left padding."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """w * x / sqrt(mean(x^2) + eps), in float32. x: [..., hidden]."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * x


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Standard LayerNorm over the last axis, in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)


class Adapters(NamedTuple):
    """Low-rank adapters (LoRA) on some projections: y = x W + scale * (x A) B."""

    a: dict  # projection name -> [layers, in, rank]
    b: dict  # projection name -> [layers, rank, out]
    scale: jax.Array  # [] float32: alpha / rank
    dropout: float = 0.0  # LoRA dropout on x, applied only when dropout_key is given (training)
    dropout_key: Optional[jax.Array] = None  # PRNG key; each layer and projection folds in its own

    def lora_input(self, h: jax.Array, layer: jax.Array, name: str) -> jax.Array:
        """h, or h with inverted dropout for the adapter of `name` in `layer` (a traced index)."""
        if self.dropout_key is None:
            return h
        key = jax.random.fold_in(jax.random.fold_in(self.dropout_key, layer), sorted(self.a).index(name))
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
        return jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)


CPU_BF16_ROW_MULTIPLE = 8  # XLA's CPU bfloat16 dot is ~3x faster on 8 rows than on 1


def _matmul(x: jax.Array, w: jax.Array, dtype, result_dtype=None) -> jax.Array:
    """x [..., in] times w [in, out] in `dtype` (result in `result_dtype`, default `dtype`), except bfloat16 weights with float32 compute on CPU.

    Those go through `_bf16_weight_matmul`: converting the weight to float32 inside the
    program would run an unfused convert of every weight at every step (and XLA may hoist
    it out of a decode loop into a float32 copy of all weights).
    """
    if w.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu":
        return _bf16_weight_matmul(x, w)
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=result_dtype)


def _bf16_weight_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] float32 times a bfloat16 weight [in, out] on CPU: a bfloat16 dot, float32 result.

    The rows of x are rounded to bfloat16 and padded to a multiple of CPU_BF16_ROW_MULTIPLE.
    Measured on this project's machine for one [4096, 11008] weight, 1 row: this 56-70 ms,
    the plain bfloat16 dot 200 ms, convert-then-float32-dot 193 ms (8 rows: 56-71 / 71 / 316);
    it stays ahead at 64 and 256 rows (prefill).
    """
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1]).astype(jnp.bfloat16)  # [rows, in]
    pad = -rows % CPU_BF16_ROW_MULTIPLE
    if pad:
        x2 = jnp.pad(x2, ((0, pad), (0, 0)))  # [rows + pad, in]
    y = jnp.matmul(x2, w, preferred_element_type=jnp.float32)[:rows]  # [rows, out]
    return y.reshape(*lead, w.shape[-1])


def forward(params: dict, tokens: jax.Array, positions: jax.Array, config: BlueLMConfig,
            cache: Optional[KVCache] = None, start: Optional[jax.Array] = None,
            compute_dtype=jnp.float32, last_only: bool = False, adapters: Optional[Adapters] = None,
            remat: bool = False, attention_impl: str = "auto") -> tuple[jax.Array, Optional[KVCache]]:
    """Logits of the next token at every position (or only the last with `last_only`).

    tokens, positions: [batch, seq] int32.
    Without a cache, attention is causal over `tokens`, with keys before `start[b]` masked.
    With a cache, the new keys/values go to slots [index, index + seq), each query sees
    slots start[b] .. its own, and the returned cache has index + seq.
    `adapters` adds LoRA terms to the projections they name; `remat` recomputes each layer's
    activations in the backward pass instead of storing them.
    Returns logits [batch, seq or 1, vocab] float32, and the updated cache (or None).
    `attention_impl` picks the attention kernel (attention.attention: "auto" is dense for short
    inputs, else flash-style/chunked or the platform kernel, never a [seq, slots] table).
    Under `jax.set_mesh(mesh)`, activations and the cache are constrained by sharding.py.
    config, compute_dtype, last_only, remat and attention_impl are static under jit.
    """
    c = config
    batch, seq = tokens.shape
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    x = jnp.take(params["embed_tokens"], tokens, axis=0)  # [batch, seq, hidden]
    if c.use_stable_embedding:
        ln = params["embed_layer_norm"]
        x = layer_norm(x, ln["weight"], ln["bias"], c.rms_norm_eps)
    x = constrain(x.astype(compute_dtype), "hidden")

    sin, cos = sin_cos(positions, c)  # [batch, seq, head_dim // 2]
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        start = jnp.zeros((batch,), jnp.int32) if start is None else start
    else:
        index, start = cache.index, cache.start
    q_offset = 0 if cache is None else index  # slot of the first query (static without a cache)

    def layer(carry, layer_inputs):
        x, kv, i = carry  # x: [batch, seq, hidden]; kv: (k, v) caches or None; i: layer index
        p, lora_a, lora_b = layer_inputs  # this layer's weights and adapters

        def project(h, name):
            y = _matmul(h, p[name], compute_dtype)
            if name in lora_a:
                y = y + (adapters.scale * _matmul(_matmul(adapters.lora_input(h, i, name), lora_a[name], compute_dtype),
                                                  lora_b[name], compute_dtype)).astype(y.dtype)
            return y

        h = rms_norm(x, p["input_layernorm"], c.rms_norm_eps)
        q = project(h, "q_proj").reshape(batch, seq, heads, head_dim)
        k = project(h, "k_proj").reshape(batch, seq, kv_heads, head_dim)
        v = project(h, "v_proj").reshape(batch, seq, kv_heads, head_dim)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        if kv is not None:
            k_cache, v_cache = kv  # [layers, batch, max_len, kv_heads, head_dim]
            at = (i, 0, index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
            kv = (k_cache, v_cache)
            k, v = k_cache, v_cache  # all layers: attention reads only layer i's filled blocks
        layer_index = None if kv is None else i
        a = attention(q, k, v, q_offset, start, attention_impl, layer_index).reshape(batch, seq, heads * head_dim)
        x = x + project(a, "o_proj").astype(x.dtype)
        h = rms_norm(x, p["post_attention_layernorm"], c.rms_norm_eps)
        gate = jax.nn.silu(project(h, "gate_proj"))
        up = project(h, "up_proj")
        x = x + project(gate * up, "down_proj").astype(x.dtype)
        return (x, kv, i + 1), None

    if remat:
        layer = jax.checkpoint(layer)
    kv = None if cache is None else (constrain(cache.k, "kv_cache"), constrain(cache.v, "kv_cache"))
    if isinstance(params["layers"], (list, tuple)):  # per-layer layout (params.unstack_layers): unrolled
        if adapters is not None:
            raise ValueError("adapters need the stacked layer layout (see params.unstack_layers)")
        carry = (x, kv, 0)
        for layer_params in params["layers"]:
            carry, _ = layer(carry, (layer_params, {}, {}))
        x, kv, _ = carry
    else:
        layer_inputs = (params["layers"], {}, {}) if adapters is None else (params["layers"], adapters.a, adapters.b)
        (x, kv, _), _ = jax.lax.scan(layer, (x, kv, jnp.zeros((), jnp.int32)), layer_inputs)

    if last_only:
        x = x[:, -1:]
    x = rms_norm(x, params["norm"], c.rms_norm_eps).astype(compute_dtype)
    logits = _matmul(x, params["lm_head"], compute_dtype, result_dtype=jnp.float32)
    logits = constrain(logits, "logits")  # [batch, seq, vocab]: rows on data, vocabulary on tensor
    new_cache = None if cache is None else KVCache(kv[0], kv[1], index + seq, start)
    return logits, new_cache
