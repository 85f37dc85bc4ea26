"""The BlueLM network as a Flax NNX module tree named like the PyTorch model.

    BlueLMForCausalLM
      model: BlueLMModel
        embed_tokens: nnx.Embed              [vocab, hidden]
        embed_layer_norm: LayerNorm          (BlueLM's "stable embedding"; when configured)
        layers[i]: DecoderLayer
          input_layernorm: RMSNorm
          self_attn: Attention               q_proj, k_proj, v_proj, o_proj: nnx.Linear (no bias)
          post_attention_layernorm: RMSNorm
          mlp: MLP                           gate_proj, up_proj, down_proj: nnx.Linear (no bias)
        norm: RMSNorm
      lm_head: nnx.Linear                    [hidden, vocab]

In the WEIGHT layout (params.py) every nnx.Linear is a `TorchLinear` holding `weight` [out, in];
in a quantized tree (params.Quantization) the projections it covers are `QuantizedLinear`s.

BlueLM is LLaMA plus a LayerNorm on the token embeddings. Every weight is declared in
params.py's table, which gives its shape and its logical axes; the axes are the weight's
`out_sharding` metadata, so `nnx.get_partition_spec(state)` and sharding.RULES give its
PartitionSpec. The numerics are pure functions (`rms_norm`, `layer_norm`, rope.py,
attention.py) that the modules call. Every projection is one `nnx.Linear` (or `TorchLinear`)
whose product is `projection_product`. Norms, softmax and logits are float32; products run in the compute
dtype the tree was built with (float32 on CPU, bfloat16 on GPU/TPU), except that bfloat16
weights with float32 compute on CPU use a bfloat16 dot with a float32 result
(`_bf16_weight_matmul`) and are never converted to float32; `load()` stores such weights in
the WEIGHT layout, which that dot reads fastest.

Layers are unrolled, one buffer per weight (the layout decision and its measurements are in
the README, "How it is built"). Each layer, its attention and its MLP run under
`jax.named_scope` ("layer_3/attention", "layer_3/mlp"), so profiles read like the model. Compiled code takes the state (`nnx.split`) and rebuilds
the module inside (`forward`, a thin wrapper: `nnx.merge(graphdef(config, dtype, layout), params)`,
the layout read from the names in `params`).

The KV cache stays outside the modules: a pytree passed in and returned, one preallocated
buffer per layer for keys and one for values, `[batch, kv_heads, max_len, head_dim]`, written
in place with `dynamic_update_slice` (an int8 cache also holds a float32 scale per slot and
head, `[batch, kv_heads, max_len]`, and quantizes the rows it writes). One buffer per layer,
not one stacked array: a layer of a stacked cache is a slice that XLA's CPU backend copies
before every product (a decode step then copied the whole cache); heads before slots, so
that a decode step's products read each head's keys as one block with no transpose
(`python -m bench.cache_layout`). Rows of a batch share one write index: prompts of different lengths are left-padded, and `start[b]` is
the first real slot of row b.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from bluelm_jax import params as P
from bluelm_jax import quantize as Q
from bluelm_jax.attention import attention, quantize_kv
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.rope import apply_rope, sin_cos
from bluelm_jax.sharding import constrain

INIT_STD = 0.02  # normal init of fresh weights (norms start at one, biases at zero)


class LayerCache(NamedTuple):
    """One layer's part of a KVCache, as Attention reads and writes it."""

    k: jax.Array  # [batch, kv_heads, max_len, head_dim]: compute dtype, or int8
    v: jax.Array
    k_scale: Optional[jax.Array] = None  # [batch, kv_heads, max_len] float32 (an int8 cache only)
    v_scale: Optional[jax.Array] = None


class KVCache(NamedTuple):
    k: tuple  # one [batch, kv_heads, max_len, head_dim] array per layer (compute dtype, or int8)
    v: tuple  # one [batch, kv_heads, max_len, head_dim] array per layer
    index: jax.Array  # [] int32: slots filled so far (the same for every row)
    start: jax.Array  # [batch] int32: first valid slot of each row
    k_scale: tuple = ()  # an int8 cache: one [batch, kv_heads, max_len] float32 per layer; else empty
    v_scale: tuple = ()  # (slot s of k holds k_int8[s] * k_scale[s]; attention.quantize_kv)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def quantized(self) -> bool:
        """Whether keys and values are int8 with a scale per slot and head."""
        return bool(self.k_scale)

    def layer(self, i: int) -> LayerCache:
        """Layer i's buffers, constrained to the cache's sharding (sharding.py)."""
        scales = ((constrain(self.k_scale[i], "kv_scale"), constrain(self.v_scale[i], "kv_scale"))
                  if self.quantized else ())
        return LayerCache(constrain(self.k[i], "kv_cache"), constrain(self.v[i], "kv_cache"), *scales)

    def with_layers(self, layers: list, index: jax.Array) -> "KVCache":
        """This cache with every layer's buffers replaced by `layers` (LayerCaches) and the write index."""
        scales = (tuple(x.k_scale for x in layers), tuple(x.v_scale for x in layers)) if self.quantized else ((), ())
        return KVCache(tuple(x.k for x in layers), tuple(x.v for x in layers), index, self.start, *scales)


def init_cache(config: BlueLMConfig, batch: int, max_len: int, dtype=jnp.float32,
               start: Optional[jax.Array] = None) -> KVCache:
    """An empty cache of `max_len` slots; `start` [batch] marks each row's left padding.

    dtype: of keys and values (the compute dtype), or jnp.int8 for an int8 cache with a float32
    scale per slot and head (attention.quantize_kv): half the bytes of a bfloat16 cache plus
    4 / head_dim of them for the scales."""
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    layers = range(config.num_hidden_layers)
    buffers = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in layers)  # noqa: E731
    scales = (buffers(shape[:3], jnp.float32), buffers(shape[:3], jnp.float32)) if jnp.dtype(dtype) == jnp.int8 else ()
    return KVCache(buffers(shape, dtype), buffers(shape, dtype), jnp.zeros((), jnp.int32), start, *scales)


# --------------------------------------------------------------------------- numerics


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


CPU_BF16_ROW_MULTIPLE = 8  # XLA's CPU bfloat16 dot is ~3x faster on 8 rows than on 1


def keeps_bf16_weight(weight_dtype, dtype) -> bool:
    """Whether a product runs as `_bf16_weight_matmul`: bfloat16 weight, float32 compute, CPU."""
    return (jnp.dtype(weight_dtype) == jnp.bfloat16 and dtype is not None and jnp.dtype(dtype) == jnp.float32
            and jax.default_backend() == "cpu")


def promote_projection(arrays: tuple, dtype=None, inexact: bool = True) -> tuple:
    """nnx.Linear's `promote_dtype`: (x, kernel, bias) cast to the compute dtype, except a bfloat16
    kernel under float32 compute on CPU, which `projection_product` takes as it is."""
    x, kernel, bias = arrays
    if keeps_bf16_weight(kernel.dtype, dtype):
        return x.astype(dtype), kernel, bias
    return nnx_dtypes.promote_dtype(arrays, dtype=dtype, inexact=inexact)


def projection_product(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None) -> jax.Array:
    """THE product of every projection: activations [..., in] by a kernel [in, out] (contracting
    the kernel's dim 0) or by a weight [out, in] (`TorchLinear`, contracting its dim 1).

    It is the `dot_general` of every `nnx.Linear` of the tree, and of the LoRA products
    (`matmul`), so a different formulation of the projections goes here and nowhere else.
    A float32 x by a bfloat16 kernel on CPU goes through `_bf16_weight_matmul`.
    """
    del out_sharding  # activations are constrained by sharding.constrain instead
    if keeps_bf16_weight(rhs.dtype, lhs.dtype):
        (lhs_contract, rhs_contract), _ = dimension_numbers
        assert tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) in ((0,), (1,)), dimension_numbers
        return _bf16_weight_matmul(lhs, rhs, rhs_contract[0])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def _bf16_weight_matmul(x: jax.Array, w: jax.Array, w_in_axis: int = 0) -> jax.Array:
    """x [..., in] float32 times a bfloat16 weight on CPU, [in, out] (w_in_axis 0) or [out, in]
    (w_in_axis 1): a bfloat16 dot with a float32 result.

    Converting the weight to float32 inside the program would run an unfused convert of every
    weight at every step (and XLA may hoist it out of a decode loop into a float32 copy of all
    weights). The rows of x are rounded to bfloat16 and padded to a multiple of
    CPU_BF16_ROW_MULTIPLE. Measured on this project's machine for one 4096 x 11008 weight
    (`python -m bench.cpu_products`): 1 row [out, in] 8.5 ms, [in, out] 18.5 ms, the plain
    bfloat16 dot of 1 row 65 ms, float32 weights 7.3 ms; [out, in] stays ahead at 32 rows and
    is level at 256 and 1024 (prefill).
    """
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1]).astype(jnp.bfloat16)  # [rows, in]
    pad = -rows % CPU_BF16_ROW_MULTIPLE
    if pad:
        x2 = jnp.pad(x2, ((0, pad), (0, 0)))  # [rows + pad, in]
    # jax.lax.dot_general, not jnp.matmul: the projection's product must be the dot_general that
    # qwix (bluelm_jax/ecosystem.py) intercepts; inside jnp.matmul's own jit it cannot add weights
    y = jax.lax.dot_general(x2, w, (((1,), (w_in_axis,)), ((), ())),
                            preferred_element_type=jnp.float32)[:rows]  # [rows, out]
    return y.reshape(*lead, w.shape[1 - w_in_axis])


def keep_table_dtype(arrays: tuple, dtype=None, inexact: bool = True) -> tuple:
    """nnx.Embed's `promote_dtype`: the table as stored. Only the looked-up rows are cast (by the
    model), never the whole [vocab, hidden] table (which nnx.Embed would cast to param_dtype)."""
    return arrays


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [..., in] @ w [in, out] in `dtype`, promoted and multiplied as nnx.Linear does here."""
    x, w, _ = promote_projection((x, w, None), dtype)
    return projection_product(x, w, (((x.ndim - 1,), (0,)), ((), ())))


class Adapters(NamedTuple):
    """Low-rank adapters (LoRA) on some projections: y = x W + scale * (x A) B."""

    a: dict  # projection name (q_proj, ...) -> [layers, in, rank]
    b: dict  # projection name -> [layers, rank, out]
    scale: jax.Array  # [] float32: alpha / rank
    dropout: float = 0.0  # LoRA dropout on x, applied only when dropout_key is given (training)
    dropout_key: Optional[jax.Array] = None  # PRNG key; each layer and projection folds in its own

    def lora_input(self, h: jax.Array, layer: int, name: str) -> jax.Array:
        """h, or h with inverted dropout for the adapter of `name` in `layer`."""
        if self.dropout_key is None:
            return h
        key = jax.random.fold_in(jax.random.fold_in(self.dropout_key, layer), sorted(self.a).index(name))
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
        return jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)

    def term(self, h: jax.Array, layer: int, name: str, dtype) -> Optional[jax.Array]:
        """scale * dropout(h) A B for projection `name` of `layer`, or None without an adapter there."""
        if name not in self.a:
            return None
        a, b = self.a[name][layer], self.b[name][layer]  # [in, rank], [rank, out]
        return self.scale * matmul(matmul(self.lora_input(h, layer, name), a, dtype), b, dtype)


class Context(NamedTuple):
    """What every layer of one forward pass shares."""

    sin: jax.Array  # [batch, seq, head_dim // 2] float32
    cos: jax.Array
    index: jax.Array  # [] int32: the cache slot of the first new token (0 without a cache)
    start: jax.Array  # [batch] int32: first valid slot of each row ([batch, seq]: of each query, no cache)
    q_offset: Any  # 0 (a Python int: static) without a cache, else `index`
    attention_impl: str
    adapters: Optional[Adapters]


# --------------------------------------------------------------------------- building blocks


def _metadata(weight: P.Weight) -> dict:
    """The Flax metadata of a declared weight: its logical axes (never sharded at creation)."""
    return {"out_sharding": weight.axes, "eager_sharding": False}


def _param(weight: P.Weight, config: BlueLMConfig, value: float, param_dtype) -> nnx.Param:
    return nnx.Param(jnp.full(P.shape_of(weight, config), value, param_dtype), **_metadata(weight))


class TorchLinear(nnx.Module):
    """A bias-free projection holding its weight as torch.nn.Linear does: `weight` [out, in].

    The WEIGHT layout's projection (params.py), which `load()` picks for bfloat16 weights
    under float32 compute on CPU: XLA's CPU bfloat16 dot reads a row-major [out, in] weight
    about twice as fast as [in, out] at decode's 1-8 rows (`_bf16_weight_matmul`). It computes
    what nnx.Linear computes, through the same `promote_projection` and `projection_product`.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 weight_metadata: dict, preferred_element_type=None):
        init = nnx.initializers.normal(INIT_STD)
        self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype), **weight_metadata)
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.preferred_element_type = dtype, preferred_element_type

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        x, weight, _ = promote_projection((x, self.weight[...], None), self.dtype)
        kwargs = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        return projection_product(x, weight, (((x.ndim - 1,), (1,)), ((), ())), **kwargs)


class QuantizedLinear(nnx.Module):
    """A bias-free projection with weight-only quantized weights (params.Quantization): `qvalue`
    (int8 [out, in], or int4 packed two a byte [out, in / 2]), `scale`, and for GPTQ/AWQ int4
    `offset`. The product (quantize.int8_product / int4_product) dequantizes inside the compiled
    step (on CPU an integer dot or blocks of output channels; elsewhere a multiply-reduce at one
    row, else inside the dot), so the float weight never exists whole. It returns the compute
    dtype (float32 with preferred_element_type)."""

    def __init__(self, weight: P.Weight, config: BlueLMConfig, quantization: P.Quantization, *, dtype,
                 preferred_element_type=None):
        for name, (shape, axes, leaf_dtype) in quantization.leaves(weight, config).items():
            setattr(self, name, nnx.Param(jnp.zeros(shape, leaf_dtype), out_sharding=axes, eager_sharding=False))
        self.kind, self.dtype, self.preferred_element_type = quantization.kind, dtype, preferred_element_type

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        x = x.astype(self.dtype)
        if self.kind == "int8":
            y = Q.int8_product(x, self.qvalue[...], self.scale[...], 1)
        else:
            offset = getattr(self, P.OFFSET, None)
            y = Q.int4_product(x, self.qvalue[...], self.scale[...], 1, offset=None if offset is None else offset[...])
        return y if self.preferred_element_type is not None else y.astype(self.dtype)  # y is float32


def _linear(weight: P.Weight, config: BlueLMConfig, dtype, param_dtype, rngs: nnx.Rngs, layout: str,
            quantization: Optional[P.Quantization] = None, **kwargs) -> nnx.Linear | TorchLinear | QuantizedLinear:
    """The bias-free projection of a declared [in, out] kernel: a QuantizedLinear where `quantization`
    covers it, else (computing with `projection_product`) an nnx.Linear in the KERNEL layout and a
    TorchLinear in the WEIGHT layout."""
    if quantization is not None and quantization.covers(weight.path):
        return QuantizedLinear(weight, config, quantization, dtype=dtype, **kwargs)
    fan_in, fan_out = P.shape_of(weight, config)
    if layout == P.WEIGHT:
        return TorchLinear(fan_in, fan_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           weight_metadata=_metadata(weight.in_layout(layout)), **kwargs)
    return nnx.Linear(fan_in, fan_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(INIT_STD), dot_general=projection_product,
                      promote_dtype=promote_projection, kernel_metadata=_metadata(weight), rngs=rngs, **kwargs)


class RMSNorm(nnx.Module):
    """RMSNorm with a `weight`, computed in float32."""

    def __init__(self, weight: P.Weight, config: BlueLMConfig, param_dtype):
        self.weight = _param(weight, config, 1.0, param_dtype)
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with a `weight` and a `bias`, computed in float32 (BlueLM's embedding LayerNorm)."""

    def __init__(self, path: tuple[str, ...], config: BlueLMConfig, param_dtype):
        self.weight = _param(P.top_weight((*path, "weight")), config, 1.0, param_dtype)
        self.bias = _param(P.top_weight((*path, "bias")), config, 0.0, param_dtype)
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


def _project(linear: nnx.Linear, name: str, h: jax.Array, layer: int, adapters: Optional[Adapters]) -> jax.Array:
    """linear(h), plus the LoRA term of projection `name` when `adapters` has one."""
    y = linear(h)
    lora = None if adapters is None else adapters.term(h, layer, name, linear.dtype)
    return y if lora is None else y + lora.astype(y.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads and rotary positions; the cache is passed through."""

    def __init__(self, config: BlueLMConfig, dtype, param_dtype, rngs: nnx.Rngs, layout: str,
                 quantization: Optional[P.Quantization]):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, _linear(P.layer_weight(("self_attn", name, P.KERNEL)), config, dtype, param_dtype,
                                        rngs, layout, quantization))
        self.config = config

    def __call__(self, h: jax.Array, ctx: Context, kv: Optional[LayerCache],
                 layer: int) -> tuple[jax.Array, Optional[LayerCache]]:
        """h: [batch, seq, hidden] -> ([batch, seq, hidden], kv). kv: this layer's cache, or None."""
        c = self.config
        batch, seq, _ = h.shape
        project = functools.partial(_project, h=h, layer=layer, adapters=ctx.adapters)
        q = project(self.q_proj, "q_proj").reshape(batch, seq, c.num_attention_heads, c.head_dim)
        k = project(self.k_proj, "k_proj").reshape(batch, seq, c.num_key_value_heads, c.head_dim)
        v = project(self.v_proj, "v_proj").reshape(batch, seq, c.num_key_value_heads, c.head_dim)
        q, k = apply_rope(q, ctx.sin, ctx.cos), apply_rope(k, ctx.sin, ctx.cos)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [batch, kv_heads, seq, head_dim]
        scales = (None, None)
        if kv is not None:
            kv = _write_cache(kv, k, v, ctx.index)
            k, v, scales = kv.k, kv.v, (kv.k_scale, kv.v_scale)
        a = attention(q, k, v, ctx.q_offset, ctx.start, ctx.attention_impl, *scales)
        a = a.reshape(batch, seq, c.num_attention_heads * c.head_dim)
        return _project(self.o_proj, "o_proj", a, layer, ctx.adapters), kv


def _write_cache(kv: LayerCache, k: jax.Array, v: jax.Array, index: jax.Array) -> LayerCache:
    """kv with the new keys and values k, v [batch, kv_heads, seq, head_dim] at slots [index, index + seq)
    (quantized, with their scales, into an int8 cache)."""
    def put(buffer, x):  # buffer [batch, kv_heads, max_len(, head_dim)] <- x [batch, kv_heads, seq(, head_dim)]
        return jax.lax.dynamic_update_slice(buffer, x.astype(buffer.dtype), (0, 0, index) + (0,) * (x.ndim - 3))

    if kv.k_scale is None:
        return LayerCache(put(kv.k, k), put(kv.v, v))
    (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
    return LayerCache(put(kv.k, k), put(kv.v, v), put(kv.k_scale, k_scale), put(kv.v_scale, v_scale))


class MLP(nnx.Module):
    """down(silu(gate(h)) * up(h))."""

    def __init__(self, config: BlueLMConfig, dtype, param_dtype, rngs: nnx.Rngs, layout: str,
                 quantization: Optional[P.Quantization]):
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, _linear(P.layer_weight(("mlp", name, P.KERNEL)), config, dtype, param_dtype, rngs,
                                        layout, quantization))

    def __call__(self, h: jax.Array, ctx: Context, layer: int) -> jax.Array:
        project = functools.partial(_project, layer=layer, adapters=ctx.adapters)
        gate = jax.nn.silu(project(self.gate_proj, "gate_proj", h))
        up = project(self.up_proj, "up_proj", h)
        return project(self.down_proj, "down_proj", gate * up)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks, each added to the residual stream."""

    def __init__(self, config: BlueLMConfig, dtype, param_dtype, rngs: nnx.Rngs, layout: str,
                 quantization: Optional[P.Quantization]):
        self.input_layernorm = RMSNorm(P.layer_weight(("input_layernorm", "weight")), config, param_dtype)
        self.self_attn = Attention(config, dtype, param_dtype, rngs, layout, quantization)
        self.post_attention_layernorm = RMSNorm(P.layer_weight(("post_attention_layernorm", "weight")), config,
                                                param_dtype)
        self.mlp = MLP(config, dtype, param_dtype, rngs, layout, quantization)

    def __call__(self, x: jax.Array, ctx: Context, kv: Optional[tuple], layer: int) -> tuple[jax.Array, Optional[tuple]]:
        """x: [batch, seq, hidden] in the compute dtype; `layer` is this layer's index (static)."""
        with jax.named_scope("attention"):
            a, kv = self.self_attn(self.input_layernorm(x), ctx, kv, layer)
            x = x + a.astype(x.dtype)
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x), ctx, layer).astype(x.dtype)
        return x, kv


def _run_layer(layer: DecoderLayer, x: jax.Array, ctx: Context, kv: Optional[tuple], index: int,
               remat: bool) -> tuple[jax.Array, Optional[tuple]]:
    """layer(x), under `jax.checkpoint` with `remat` (its activations recomputed in the backward pass)."""
    if not remat:
        return layer(x, ctx, kv, index)
    graphdef, state = nnx.split(layer)

    @jax.checkpoint
    def run(state, x):
        return nnx.merge(graphdef, state)(x, ctx, kv, index)

    return run(state, x)


class BlueLMModel(nnx.Module):
    """Embedding (and its LayerNorm), the decoder layers, the final norm."""

    def __init__(self, config: BlueLMConfig, dtype, param_dtype, rngs: nnx.Rngs, layout: str,
                 quantization: Optional[P.Quantization]):
        embedding = P.top_weight(("model", "embed_tokens", "embedding"))
        self.embed_tokens = nnx.Embed(*P.shape_of(embedding, config), param_dtype=param_dtype,
                                      promote_dtype=keep_table_dtype, embedding_init=nnx.initializers.normal(INIT_STD),
                                      embedding_metadata=_metadata(embedding), rngs=rngs)
        self.embed_layer_norm = (LayerNorm(("model", "embed_layer_norm"), config, param_dtype)
                                 if config.use_stable_embedding else None)
        self.layers = nnx.List([DecoderLayer(config, dtype, param_dtype, rngs, layout, quantization)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(P.top_weight(("model", "norm", "weight")), config, param_dtype)
        self.config, self.dtype = config, dtype

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Optional[KVCache], start: Optional[jax.Array],
                 adapters: Optional[Adapters], remat: bool, attention_impl: str) -> tuple[jax.Array, Optional[KVCache]]:
        """The final normed hidden states [batch, seq, hidden] float32, and the updated cache."""
        batch, seq = tokens.shape
        x = self.embed_tokens(tokens)  # [batch, seq, hidden]
        if self.embed_layer_norm is not None:
            x = self.embed_layer_norm(x)
        x = constrain(x.astype(self.dtype), "hidden")
        sin, cos = sin_cos(positions, self.config)  # [batch, seq, head_dim // 2]
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            start = jnp.zeros((batch,), jnp.int32) if start is None else start
            q_offset = 0
        else:
            index, start, q_offset = cache.index, cache.start, cache.index
        ctx = Context(sin, cos, index, start, q_offset, attention_impl, adapters)
        written = []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            with jax.named_scope(f"layer_{i}"):
                x, kv = _run_layer(layer, x, ctx, kv, i, remat)
            written.append(kv)
        new_cache = None if cache is None else cache.with_layers(written, index + seq)
        return self.norm(x), new_cache


class BlueLMForCausalLM(nnx.Module):
    """The decoder and its language-model head; call it for logits (see `__call__`)."""

    def __init__(self, config: BlueLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: Optional[nnx.Rngs] = None, layout: str = P.KERNEL,
                 quantization: Optional[P.Quantization] = None):
        """dtype: the compute dtype of the products; param_dtype: of fresh weights; rngs: their init;
        layout: how projections are stored (params.py: KERNEL [in, out] or WEIGHT [out, in]);
        quantization: the projections it covers are QuantizedLinear (params.Quantization), zeros."""
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.model = BlueLMModel(config, dtype, param_dtype, rngs, P.check_layout(layout), quantization)
        self.lm_head = _linear(P.top_weight(("lm_head", P.KERNEL)), config, dtype, param_dtype, rngs, layout,
                               quantization, preferred_element_type=jnp.float32)
        self.config = config

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Optional[KVCache] = None,
                 start: Optional[jax.Array] = None, *, last_only: bool = False,
                 adapters: Optional[Adapters] = None, remat: bool = False,
                 attention_impl: str = "auto") -> tuple[jax.Array, Optional[KVCache]]:
        """Logits of the next token at every position (or only the last with `last_only`).

        tokens, positions: [batch, seq] int32.
        Without a cache, attention is causal over `tokens`, with keys before `start[b]` masked
        (or, with start [batch, seq], each query's keys before its own start[b, t]: packed rows).
        With a cache, the new keys/values go to slots [index, index + seq), each query sees
        slots start[b] .. its own, and the returned cache has index + seq.
        `adapters` adds LoRA terms to the projections they name; `remat` recomputes each layer's
        activations in the backward pass instead of storing them. `attention_impl` picks the
        attention kernel (attention.attention: "auto" is dense for short inputs, else
        flash-style/chunked or the platform kernel, never a [seq, slots] table).
        Returns logits [batch, seq or 1, vocab] float32, and the updated cache (or None).
        Under `jax.set_mesh(mesh)`, activations and the cache are constrained by sharding.py.
        """
        x, cache = self.model(tokens, positions, cache, start, adapters, remat, attention_impl)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        return constrain(logits, "logits"), cache  # [batch, seq, vocab]: rows on data, vocabulary on tensor


# --------------------------------------------------------------------------- functional entry points


def abstract_model(config: BlueLMConfig, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                   layout: str = P.KERNEL, quantization: Optional[P.Quantization] = None) -> BlueLMForCausalLM:
    """The module tree with jax.ShapeDtypeStructs for weights (nothing allocated).

    (Not `nnx.eval_shape`: under an ambient mesh it would read the logical axes as mesh axes.)"""
    graph, state = jax.eval_shape(lambda: nnx.split(BlueLMForCausalLM(
        config, dtype=compute_dtype, param_dtype=param_dtype, layout=layout, quantization=quantization)))
    return nnx.merge(graph, state)


@functools.lru_cache(maxsize=32)
def graphdef(config: BlueLMConfig, compute_dtype=jnp.float32, layout: str = P.KERNEL,
             quantization: Optional[P.Quantization] = None) -> nnx.GraphDef:
    """The static structure of the tree (what `nnx.merge` rebuilds it from), one per config, dtype,
    layout and quantization."""
    return nnx.split(abstract_model(config, jnp.dtype(compute_dtype), layout=layout, quantization=quantization))[0]


def init_params(config: BlueLMConfig, seed: int = 0, param_dtype=jnp.float32) -> dict:
    """Fresh random parameters (normal(0.02) weights, unit norms) as the plain state dict."""
    module = BlueLMForCausalLM(config, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    return nnx.state(module, nnx.Param).to_pure_dict()


def build(config: BlueLMConfig, params: dict, compute_dtype=jnp.float32) -> BlueLMForCausalLM:
    """The module tree holding `params` (a state dict as in params.py, in either layout, quantized or
    not: both read from its leaves; arrays are shared, not copied)."""
    return nnx.merge(graphdef(config, jnp.dtype(compute_dtype), P.layout_of(params), P.quantization_of(params)),
                     params)


def forward(params: dict, tokens: jax.Array, positions: jax.Array, config: BlueLMConfig,
            cache: Optional[KVCache] = None, start: Optional[jax.Array] = None,
            compute_dtype=jnp.float32, last_only: bool = False, adapters: Optional[Adapters] = None,
            remat: bool = False, attention_impl: str = "auto") -> tuple[jax.Array, Optional[KVCache]]:
    """`BlueLMForCausalLM.__call__` on the module rebuilt from `params` (`build`): the form
    compiled code calls. config, compute_dtype, last_only, remat and attention_impl are static under jit."""
    return build(config, params, compute_dtype)(tokens, positions, cache, start, last_only=last_only,
                                                adapters=adapters, remat=remat, attention_impl=attention_impl)
