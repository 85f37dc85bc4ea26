"""Chunked (flash-style) attention against dense attention; long-context prefill and decode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bluelm_jax import attention as A
from bluelm_jax.config import preset
from bluelm_jax.model import forward, init_cache
from bluelm_jax.params import param_shapes
from bluelm_jax.rope import apply_rope, sin_cos

RNG = np.random.default_rng(0)


def random_params(config, seed=0, std=0.08):
    shapes = param_shapes(config)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [std * jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def rotated_qkv(config, batch, seq, slots, first_position):
    """q [batch, seq, heads, head_dim] and k, v [batch, kv_heads, slots, head_dim], rotated at far positions."""
    h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = RNG.standard_normal((batch, seq, h, d), np.float32)
    k = RNG.standard_normal((batch, slots, kvh, d), np.float32)
    v = RNG.standard_normal((batch, slots, kvh, d), np.float32)
    q, k = _rotate(q, k, first_position, config)
    return q, k.swapaxes(1, 2), jnp.asarray(v).swapaxes(1, 2)


@functools.partial(jax.jit, static_argnums=(3,))
def _rotate(q, k, first_position, config):
    batch, slots, seq = k.shape[0], k.shape[1], q.shape[1]
    kpos = jnp.broadcast_to(first_position + jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    sin, cos = sin_cos(kpos, config)
    return apply_rope(q, sin[:, slots - seq:], cos[:, slots - seq:]), apply_rope(k, sin, cos)


@functools.partial(jax.jit, static_argnums=(3,))
def dense_attention(q, k, v, q_offset, start):
    return A.attention(q, k, v, q_offset, start, "dense")


def valid_rows(q_offset, seq, start):
    """[batch, seq] bool: queries that see at least one key (not left padding)."""
    return (q_offset + np.arange(seq))[None, :] >= np.asarray(start)[:, None]


@pytest.mark.parametrize("name,seq,pad", [
    ("tiny", 1, 0), ("tiny", 1500, 211), ("tiny-gqa", 700, 5),
    ("tiny-32k", 4096, 0), ("tiny-32k", 4096, 1000),
])
def test_chunked_equals_dense(name, seq, pad):
    config = preset(name)
    q, k, v = rotated_qkv(config, 2, seq, seq, first_position=28_000 if config.rope_scaling else 1_000)
    start = jnp.asarray([pad, 0], jnp.int32)
    dense = dense_attention(q, k, v, 0, start)
    chunked = jax.jit(A.chunked_attention, static_argnums=(3,))(q, k, v, 0, start)
    valid = valid_rows(0, seq, start)
    err = np.abs(np.asarray(chunked - dense))[valid].max()
    assert err <= 1e-5, err
    assert np.all(np.asarray(chunked)[~valid] == 0)  # rows that see nothing: zeros, never NaN


@pytest.mark.parametrize("q_offset,seq,slots,block", [(0, 300, 512, 128), (77, 50, 300, 64), (4000, 1, 4096, 512),
                                                      (511, 1, 1024, 512), (130, 6, 200, 64)])
def test_chunked_with_cache_offsets_equals_dense(q_offset, seq, slots, block):
    """A traced q_offset (the cache index): prefill continuation and decode over a long cache."""
    config = preset("tiny-32k")
    q, k, v = rotated_qkv(config, 2, seq, slots, first_position=0)
    start = jnp.asarray([3, 0], jnp.int32)
    dense = dense_attention(q, k, v, q_offset, start)
    fn = jax.jit(lambda q, k, v, off, s: A.chunked_attention(q, k, v, off, s, block, block))
    chunked = fn(q, k, v, jnp.int32(q_offset), start)
    valid = valid_rows(q_offset, seq, start)
    assert np.abs(np.asarray(chunked - dense))[valid].max() <= 1e-5


def test_decode_reads_only_the_filled_blocks():
    """NaN in cache blocks past the filled part must not reach the output: they are never read."""
    config = preset("tiny")
    filled = 150
    q, k0, v0 = rotated_qkv(config, 1, 1, 4096, first_position=0)
    start = jnp.zeros((1,), jnp.int32)
    dense = dense_attention(q, k0[:, :, :filled + 1], v0[:, :, :filled + 1], filled, start)
    for block, run in [(64, lambda q, k, v, off: A.chunked_attention(q, k, v, off, start, 64, 64)),
                       (A.BLOCK_K, lambda q, k, v, off: A.attention(q, k, v, off, start))]:  # as the model calls it
        end = -(-(filled + 1) // block) * block  # first block boundary past the query's slot
        k, v = k0.at[:, :, end:].set(jnp.nan), v0.at[:, :, end:].set(jnp.nan)
        out = jax.jit(run)(q, k, v, jnp.int32(filled))
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)


def test_chunked_is_differentiable():
    config = preset("tiny-gqa")
    q, k, v = rotated_qkv(config, 1, 96, 96, first_position=0)
    start = jnp.asarray([9], jnp.int32)

    valid = valid_rows(0, 96, start)[0]

    def loss(fn, q, k, v):  # rows of left padding excluded: dense and chunked differ there by design
        return jnp.sum(jnp.sin(fn(q, k, v))[:, valid])

    grads = jax.grad(lambda *a: loss(lambda q, k, v: A.chunked_attention(q, k, v, 0, start, 32, 32), *a),
                     argnums=(0, 1, 2))(q, k, v)
    dense = jax.grad(lambda *a: loss(lambda q, k, v: dense_attention(q, k, v, 0, start), *a),
                     argnums=(0, 1, 2))(q, k, v)
    for g, h in zip(grads, dense):  # q [batch, seq, ...]; k, v [batch, kv_heads, seq, ...]
        at = (slice(None), valid) if g.shape == q.shape else (slice(None), slice(None), valid)
        np.testing.assert_allclose(np.asarray(g)[at], np.asarray(h)[at], atol=1e-5)


def test_cudnn_path_padding_logic(monkeypatch):
    """The cuDNN wrapper rolls left padding to right padding; check it with XLA's implementation."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
    config = preset("tiny-gqa")
    q, k, v = rotated_qkv(config, 3, 40, 40, first_position=0)
    start = jnp.asarray([0, 7, 39], jnp.int32)
    out = jax.jit(A.cudnn_attention)(q, k, v, start)
    dense = dense_attention(q, k, v, 0, start)
    valid = valid_rows(0, 40, start)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(dense)[valid], atol=1e-5)
    assert np.all(np.asarray(out)[~valid] == 0)


def test_dispatch():
    config = preset("tiny")
    q, k, v = rotated_qkv(config, 1, 8, 8, first_position=0)
    start = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        A.attention(q, k, v, 0, start, "magic")
    assert A.platform_kernel("cpu", jnp.bfloat16, 4096, 128) is None
    assert A.platform_kernel("gpu", jnp.bfloat16, 4096, 128) is A.cudnn_attention
    assert A.platform_kernel("gpu", jnp.float32, 4096, 128) is None  # cuDNN flash needs 16-bit inputs


@pytest.mark.parametrize("implementation,block", [("dense", 512), ("chunked", 64)])
def test_packed_sequences_attend_only_within_themselves(implementation, block):
    """A row holding sequences of 70, 130 and 56 tokens one after another, with each query's start at
    its own sequence's first slot: each sequence's outputs equal those of that sequence alone."""
    config = preset("tiny-gqa")
    lengths = (70, 130, 56)
    q, k, v = rotated_qkv(config, 1, sum(lengths), sum(lengths), first_position=0)
    offsets = np.cumsum((0,) + lengths)
    start = jnp.asarray(np.repeat(offsets[:-1], lengths)[None, :], jnp.int32)  # [1, seq]
    if implementation == "dense":
        packed = A.attention(q, k, v, 0, start, "dense")
    else:
        packed = A.chunked_attention(q, k, v, 0, start, block_q=block, block_k=block)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        alone = dense_attention(q[:, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], 0, jnp.zeros((1,), jnp.int32))
        np.testing.assert_allclose(packed[:, lo:hi], alone, atol=2e-5)
    with pytest.raises(ValueError, match="one start per row"):
        A.attention(q, k, v, 0, start, "cudnn")


@pytest.mark.parametrize("name,seq,pad", [("tiny-32k", 4096, 300)])
def test_model_logits_chunked_equal_dense(name, seq, pad):
    """Whole-model logits with chunked and dense attention, left-padded, plain and ntkmixed rotary."""
    config = preset(name)
    params = random_params(config, seed=1)
    tokens = jnp.asarray(RNG.integers(4, config.vocab_size, (1, seq)), jnp.int32)
    positions = jnp.maximum(jnp.arange(seq, dtype=jnp.int32) - pad, 0)[None]
    start = jnp.asarray([pad], jnp.int32)
    run = jax.jit(lambda impl: forward(params, tokens, positions, config, start=start, attention_impl=impl)[0],
                  static_argnums=0)
    dense, chunked = np.asarray(run("dense"))[0, pad:], np.asarray(run("chunked"))[0, pad:]
    np.testing.assert_allclose(chunked, dense, atol=1e-5)


def test_ntkmixed_prefills_8192_tokens_without_a_quadratic_array():
    """A small ntkmixed model prefills 8,192 tokens into a cache (chunked by default), then decodes
    one token reading the long cache; the compiled program holds no [8192, 8192] array."""
    config = preset("tiny-32k").replace(num_hidden_layers=1)
    params = random_params(config, seed=2)
    n = 8192
    tokens = jnp.asarray(RNG.integers(4, config.vocab_size, (1, n + 1)), jnp.int32)
    positions = jnp.arange(n + 1, dtype=jnp.int32)[None]

    @jax.jit
    def prefill(tokens, positions):
        cache = init_cache(config, 1, n + 64)
        return forward(params, tokens, positions, config, cache=cache, last_only=True)

    @jax.jit
    def decode(token, position, cache):
        return forward(params, token, position, config, cache=cache)

    hlo = prefill.lower(tokens[:, :n], positions[:, :n]).as_text()
    assert "8192x8192" not in hlo and "8192x8256" not in hlo
    logits, cache = prefill(tokens[:, :n], positions[:, :n])
    assert int(cache.index) == n and np.isfinite(np.asarray(logits)).all()
    step, _ = decode(tokens[:, n:], positions[:, n:], cache)
    # the same last position from one prefill of n + 1 tokens
    full, _ = prefill(tokens, positions)
    np.testing.assert_allclose(np.asarray(step[:, -1]), np.asarray(full[:, -1]), atol=1e-4)


# ------------------------------------------------------------------ int8 cache


def test_quantize_kv_round_trip_and_zero_rows():
    x = jnp.asarray(RNG.standard_normal((2, 3, 7, 64)).astype(np.float32) * RNG.uniform(0.01, 10, (2, 3, 7, 1)))
    x = x.at[1, 2, 4].set(0.0)  # an all-zero row (e.g. a slot never written)
    q, scale = A.quantize_kv(x)
    assert q.dtype == jnp.int8 and q.shape == x.shape and scale.dtype == jnp.float32 and scale.shape == (2, 3, 7)
    np.testing.assert_allclose(np.asarray(scale), np.abs(np.asarray(x)).max(-1) / 127, rtol=1e-6)
    assert np.abs(np.asarray(q)).max() == 127  # the largest element of each row maps to +-127
    err = np.abs(np.asarray(A.dequantize_kv(q, scale, jnp.float32)) - np.asarray(x))
    assert np.all(err <= np.asarray(scale)[..., None] / 2 * (1 + 1e-5))  # rounding: half a step at most
    assert float(scale[1, 2, 4]) == 0 and np.all(np.asarray(q[1, 2, 4]) == 0)


@pytest.mark.parametrize("q_offset,seq,slots,block", [(0, 200, 256, 64), (130, 6, 200, 64), (700, 1, 1024, 128)])
def test_int8_cache_kernels_agree(q_offset, seq, slots, block):
    """Dense and chunked attention over int8 keys/values with their scales give the same result, and it
    is attention over the dequantized keys/values (the scales folded into scores and probabilities
    are exact algebra, not an approximation)."""
    config = preset("tiny-gqa")
    q, k, v = rotated_qkv(config, 2, seq, slots, first_position=0)
    (k8, k_scale), (v8, v_scale) = A.quantize_kv(k), A.quantize_kv(v)
    start = jnp.asarray([5, 0], jnp.int32)
    offset = jnp.int32(q_offset)
    dense = jax.jit(lambda *a: A.attention(*a, "dense", k_scale, v_scale))(q, k8, v8, offset, start)
    chunked = jax.jit(lambda *a: A.chunked_attention(*a, block, block, k_scale=k_scale, v_scale=v_scale))(
        q, k8, v8, offset, start)
    dequantized = dense_attention(q, A.dequantize_kv(k8, k_scale, jnp.float32),
                                  A.dequantize_kv(v8, v_scale, jnp.float32), q_offset, start)
    valid = valid_rows(q_offset, seq, start)
    assert np.abs(np.asarray(chunked - dense))[valid].max() <= 1e-5
    assert np.abs(np.asarray(dense - dequantized))[valid].max() <= 1e-5
    float_cache = dense_attention(q, k, v, q_offset, start)
    assert 0 < np.abs(np.asarray(dense - float_cache))[valid].max() <= 0.05  # int8 is close, not equal


def test_int8_cache_platform_kernel_reads_the_dequantized_prompt(monkeypatch):
    """A fresh prefill through the cuDNN wrapper (XLA's implementation here) over an int8 cache: the
    same values as the dense kernel reading the int8 cache."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
    config = preset("tiny-gqa")
    q, k, v = rotated_qkv(config, 2, 40, 64, first_position=0)
    (k8, k_scale), (v8, v_scale) = A.quantize_kv(k), A.quantize_kv(v)
    start = jnp.asarray([0, 7], jnp.int32)
    run = jax.jit(lambda impl, *a: A.attention(*a, impl, k_scale, v_scale), static_argnums=0)
    cudnn = run("cudnn", q, k8, v8, jnp.int32(0), start)
    dense = run("dense", q, k8, v8, jnp.int32(0), start)
    valid = valid_rows(0, 40, start)
    np.testing.assert_allclose(np.asarray(cudnn)[valid], np.asarray(dense)[valid], atol=1e-5)
