"""Per-component parity of the model's numerics with torch/transformers, and the KV cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from bluelm_jax import rope
from bluelm_jax.config import NTKMIXED_32K, RopeScaling, preset
from bluelm_jax.model import Adapters, init_cache, layer_norm, rms_norm
from bluelm_jax.model import forward as eager_forward
from bluelm_jax.params import LAYER_PROJECTIONS, LAYERS, get_path, param_shapes, set_path, shape_of
from tests.hf_reference import ntkmixed_inv_freq_torch

# compiled once per shape: op by op, the model's tests took several times as long
forward = jax.jit(eager_forward, static_argnames=("config", "compute_dtype", "last_only", "remat", "attention_impl"))

RNG = np.random.default_rng(0)


def test_plain_inv_freq_matches_transformers():
    config = preset("tiny")
    llama = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads)
    ref, _ = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(llama)
    np.testing.assert_allclose(rope.inv_freq(config), ref.numpy(), rtol=1e-6)


def test_ntkmixed_inv_freq_formula():
    config = preset("tiny-32k")
    plain = rope.inv_freq(preset("tiny")).astype(np.float64)
    ntk = rope.inv_freq(config).astype(np.float64)
    # The lowest frequency is divided by exactly `factor`, the highest by factor^(1/(d/2)^power).
    np.testing.assert_allclose(ntk[-1], plain[-1] / 16.0, rtol=1e-6)
    np.testing.assert_allclose(ntk[0], plain[0] / 16.0 ** (1 / 64**0.3), rtol=1e-6)
    assert np.all(np.diff(plain / ntk) > 0)  # the stretch grows towards low frequencies
    ref = ntkmixed_inv_freq_torch(128, 10000.0, 16.0, 0.3).numpy()
    np.testing.assert_allclose(ntk, ref, rtol=2e-6)


def test_linear_scaling_matches_transformers():
    config = preset("tiny").replace(rope_scaling=RopeScaling("linear", 4.0))
    llama = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    rotary = modeling_llama.LlamaRotaryEmbedding(llama)
    np.testing.assert_allclose(rope.inv_freq(config), rotary.inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rope.inv_freq(config), rope.inv_freq(preset("tiny")) / 4.0, rtol=1e-7)
    positions = np.arange(0, 3000, 7)[None]
    cos_ref, sin_ref = rotary(torch.zeros(1), torch.from_numpy(positions))
    sin, cos = rope.sin_cos(jnp.asarray(positions), config)
    half = config.head_dim // 2
    # The two float32 tables differ by an ulp in a few entries: ~1e-5 at these angles.
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy()[..., :half], atol=5e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy()[..., :half], atol=5e-5)


def test_apply_rope_matches_transformers_rotate_half():
    config = preset("tiny")
    x = RNG.standard_normal((2, 9, 3, config.head_dim)).astype(np.float32)  # [batch, seq, heads, head_dim]
    positions = RNG.integers(0, 2048, (2, 9))
    sin, cos = rope.sin_cos(jnp.asarray(positions), config)
    ours = rope.apply_rope(jnp.asarray(x), sin, cos)
    cos_full = np.concatenate([np.asarray(cos)] * 2, -1)  # [batch, seq, head_dim]
    sin_full = np.concatenate([np.asarray(sin)] * 2, -1)
    xt = torch.from_numpy(x.transpose(0, 2, 1, 3))  # [batch, heads, seq, head_dim]
    ref, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, torch.from_numpy(cos_full), torch.from_numpy(sin_full))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 1, 3), atol=1e-6)


def test_norms_match_torch():
    x = RNG.standard_normal((3, 5, 64)).astype(np.float32) * 3
    w, b = RNG.standard_normal(64).astype(np.float32), RNG.standard_normal(64).astype(np.float32)
    ref_rms = modeling_llama.LlamaRMSNorm(64, eps=1e-6)
    ref_rms.weight.data = torch.from_numpy(w)
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), w, 1e-6)),
                               ref_rms(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    ref_ln = torch.nn.functional.layer_norm(torch.from_numpy(x), (64,), torch.from_numpy(w), torch.from_numpy(b), 1e-6)
    np.testing.assert_allclose(np.asarray(layer_norm(jnp.asarray(x), w, b, 1e-6)), ref_ln.numpy(), atol=1e-5)


def random_params(config, seed=0):
    shapes = param_shapes(config)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.08 * jax.random.normal(k, s) for k, s in zip(keys, leaves)])


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-32k"])
def test_cached_steps_equal_one_forward(name):
    config = preset(name)
    params = random_params(config)
    tokens = jnp.asarray(RNG.integers(0, config.vocab_size, (2, 24)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    full, _ = forward(params, tokens, positions, config)
    cache = init_cache(config, 2, 32)
    pieces = []
    for lo, hi in [(0, 16), (16, 17), (17, 18), (18, 24)]:
        logits, cache = forward(params, tokens[:, lo:hi], positions[:, lo:hi], config, cache)
        pieces.append(logits)
    assert int(cache.index) == 24
    np.testing.assert_allclose(np.concatenate(pieces, 1), np.asarray(full), atol=1e-5)


def test_a_decode_step_copies_no_layer_of_the_cache():
    """The cache is one buffer per layer that attention reads in place: the compiled decode step's
    temporaries stay far below one layer's keys (a stacked [layers, ...] cache was sliced per
    layer, and XLA's CPU backend copied each slice: temporaries of two layers' keys here)."""
    from bluelm_jax.decode import decode_logits

    config = preset("tiny")
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(config),
                          is_leaf=lambda s: isinstance(s, tuple))
    batch, slots = 4, 512
    cache = jax.eval_shape(lambda: init_cache(config, batch, slots))
    step = jax.jit(lambda p, token, cache: decode_logits(p, token, cache, config), donate_argnums=(2,))
    compiled = step.lower(params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache).compile()
    assert [x.shape for x in cache.k] == [(batch, config.num_key_value_heads, slots, config.head_dim)] * 2
    assert compiled.memory_analysis().temp_size_in_bytes < cache.k[0].size * 4 / 8


def test_left_padding_is_invisible():
    config = preset("tiny")
    params = random_params(config, seed=1)
    tokens = RNG.integers(4, config.vocab_size, (1, 10))
    pad = 5
    padded = np.concatenate([np.full((1, pad), config.pad_token_id), tokens], 1)
    alone, _ = forward(params, jnp.asarray(tokens, jnp.int32), jnp.arange(10, dtype=jnp.int32)[None], config)
    positions = np.maximum(0, np.arange(10 + pad) - pad)[None]
    start = jnp.asarray([pad], jnp.int32)
    batched, _ = forward(params, jnp.asarray(padded, jnp.int32), jnp.asarray(positions, jnp.int32), config, start=start)
    np.testing.assert_allclose(np.asarray(batched)[:, pad:], np.asarray(alone), atol=1e-5)
    cache = init_cache(config, 1, 32, start=start)
    cached, cache = forward(params, jnp.asarray(padded, jnp.int32), jnp.asarray(positions, jnp.int32), config, cache)
    np.testing.assert_allclose(np.asarray(cached)[:, pad:], np.asarray(alone), atol=1e-5)


def test_last_only_logits():
    config = preset("tiny")
    params = random_params(config)
    tokens = jnp.asarray(RNG.integers(0, config.vocab_size, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    full, _ = forward(params, tokens, positions, config)
    last, _ = forward(params, tokens, positions, config, last_only=True)
    assert last.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-6)


def test_ntkmixed_preset_context():
    assert preset("bluelm-7b-chat-32k").rope_scaling == NTKMIXED_32K
    assert preset("bluelm-7b-chat-32k").context_length == 32768 and preset("bluelm-7b-chat").context_length == 2048
    assert math.isclose(preset("bluelm-7b-base").num_parameters() / 1e9, 7.296, rel_tol=1e-3)


def test_adapters_equal_merged_weights_and_remat_keeps_gradients():
    config = preset("tiny")
    params = random_params(config, seed=2)
    layers, rank = config.num_hidden_layers, 4
    tokens = jnp.asarray(RNG.integers(0, config.vocab_size, (1, 9)), jnp.int32)
    positions = jnp.arange(9, dtype=jnp.int32)[None]
    shapes = {n: shape_of(LAYER_PROJECTIONS[n], config) for n in ("q_proj", "down_proj")}
    key_a, key_b = jax.random.split(jax.random.key(3))
    a = {n: 0.1 * jax.random.normal(key_a, (layers, shapes[n][0], rank)) for n in shapes}
    b = {n: 0.1 * jax.random.normal(key_b, (layers, rank, shapes[n][1])) for n in shapes}
    adapters = Adapters(a, b, jnp.float32(2.0))
    with_adapters, _ = forward(params, tokens, positions, config, adapters=adapters)
    merged = jax.tree.map(lambda x: x, params)
    for n in a:
        for i in range(layers):
            path = (*LAYERS, i, *LAYER_PROJECTIONS[n].path)
            set_path(merged, path, get_path(params, path) + 2.0 * a[n][i] @ b[n][i])
    np.testing.assert_allclose(np.asarray(with_adapters), np.asarray(forward(merged, tokens, positions, config)[0]),
                               atol=1e-5)
    base, _ = forward(params, tokens, positions, config)
    assert np.abs(np.asarray(with_adapters) - np.asarray(base)).max() > 1e-3

    def loss(p, remat):
        return forward(p, tokens, positions, config, remat=remat)[0].std()

    grads, grads_remat = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-6)


# ------------------------------------------------------------------ int8 KV cache

INT8_CACHE_LOGIT_TOLERANCE = 0.01  # max |int8 - float cache logits| at 4K (measured 0.0022; logits span 1.05)


def cache_bytes(cache) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(cache))


def test_int8_cache_halves_the_cache_memory():
    config = preset("tiny")
    bf16, int8 = (init_cache(config, 2, 96, dtype=dtype) for dtype in (jnp.bfloat16, jnp.int8))
    assert not bf16.quantized and bf16.k_scale == () and int8.quantized
    assert [x.dtype for x in int8.k + int8.v] == [jnp.int8] * 4
    assert [x.shape for x in int8.k_scale + int8.v_scale] == [(2, config.num_key_value_heads, 96)] * 4
    rows = 2 * config.num_hidden_layers * 2 * config.num_key_value_heads * 96  # (k, v), layers, batch, heads, slots
    assert cache_bytes(bf16) - cache_bytes(int8) == rows * (config.head_dim * 2 - config.head_dim - 4)
    assert cache_bytes(int8) <= cache_bytes(bf16) * (1 + 4 / config.head_dim) / 2 + 2 * 4 + 2 * 4  # + index, start


def test_int8_cache_logits_at_a_4k_context():
    """A 4,096-token prompt prefilled in chunks of 512 into a 4,104-slot cache, then 8 decode steps
    (chunked attention over the long cache): the int8 cache's logits stay within
    INT8_CACHE_LOGIT_TOLERANCE of the float cache's, and a decode step reading the int8 cache with
    dense attention gives the chunked kernel's logits."""
    config = preset("tiny-32k")
    params = random_params(config, seed=2)
    prompt, chunk, steps = 4096, 512, 8
    tokens = jnp.asarray(RNG.integers(4, config.vocab_size, (1, prompt + steps)), jnp.int32)
    positions = jnp.arange(prompt + steps, dtype=jnp.int32)[None, :]
    step = jax.jit(lambda p, t, pos, cache, impl: forward(p, t, pos, config, cache, attention_impl=impl),
                   static_argnums=4)

    def run(dtype):
        cache, logits = init_cache(config, 1, prompt + steps, dtype=dtype), []
        for lo in range(0, prompt, chunk):
            out, cache = step(params, tokens[:, lo:lo + chunk], positions[:, lo:lo + chunk], cache, "auto")
            logits.append(out)
        prefilled = cache
        for i in range(prompt, prompt + steps):
            out, cache = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache, "auto")
            logits.append(out)
        return np.concatenate(logits, axis=1), prefilled  # [1, prompt + steps, vocab]

    (exact, _), (int8, prefilled) = run(jnp.float32), run(jnp.int8)
    diff = np.abs(int8 - exact)
    assert diff.max() <= INT8_CACHE_LOGIT_TOLERANCE, diff.max()
    assert diff[:, prompt:].max() > 0  # the cache really was int8
    # the first decode step over the int8 cache, dense (the whole [1, slots] scores) against chunked
    dense, _ = step(params, tokens[:, prompt:prompt + 1], positions[:, prompt:prompt + 1], prefilled, "dense")
    np.testing.assert_allclose(np.asarray(dense)[:, 0], int8[:, prompt], atol=1e-4)
