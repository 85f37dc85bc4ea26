"""Test helper: greedy decoding with model.forward under jit, on one device or sharded over a mesh.

Used by test_sharding.py and by the worker processes of test_multihost.py, so that the
single-device, sharded and multi-process runs execute the very same program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bluelm_jax import sharding
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.model import forward, init_cache
from bluelm_jax.params import param_shapes

# Heads divisible by 8 (whole heads per device on tensor=8); 4 KV heads: on tensor=8 the
# KV projections and the cache stay replicated over tensor (the divisibility fallback).
CONFIG = BlueLMConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4)


def random_params(config: BlueLMConfig, seed: int = 0) -> dict:
    """Host (numpy) parameters, the same values on every process: norm weights near 1, the
    rest std 0.08 (so that greedy outputs vary from token to token)."""
    rng = np.random.default_rng(seed)

    def leaf(shape):
        is_norm = len(shape) == 1
        value = 1 + 0.1 * rng.standard_normal(shape) if is_norm else 0.08 * rng.standard_normal(shape)
        return value.astype(np.float32)

    return jax.tree.map(leaf, param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))


def prompts(config: BlueLMConfig, batch: int = 8, seed: int = 1, longest: int = 24):
    """Left-padded prompts of different lengths: tokens [batch, longest] int32, start [batch]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, longest + 1, batch)
    lengths[0] = longest
    tokens = np.full((batch, longest), config.pad_token_id, np.int32)
    for b, n in enumerate(lengths):
        tokens[b, longest - n:] = rng.integers(4, config.vocab_size, n)
    return tokens, (longest - lengths).astype(np.int32)


def _greedy(params, tokens, start, config: BlueLMConfig, steps: int):
    """tokens [batch, n] left-padded; returns greedy ids [batch, steps], last logits, the cache."""
    batch, n = tokens.shape
    cache = init_cache(config, batch, n + steps, start=start)
    positions = jnp.maximum(jnp.arange(n, dtype=jnp.int32)[None, :] - start[:, None], 0)  # [batch, n]
    logits, cache = forward(params, tokens, positions, config, cache=cache, last_only=True)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [batch]
    out = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(token)

    def step(i, carry):
        out, token, cache, _ = carry
        positions = (cache.index - cache.start)[:, None]  # [batch, 1]
        logits, cache = forward(params, token[:, None], positions, config, cache=cache)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return out.at[:, i].set(token), token, cache, logits[:, -1]

    out, _, cache, last = jax.lax.fori_loop(1, steps, step, (out, token, cache, logits[:, -1]))
    return out, last, cache


def greedy(params, tokens, start, config: BlueLMConfig = CONFIG, steps: int = 8, mesh=None):
    """Greedy ids [batch, steps] and last logits [batch, vocab] as numpy, plus the (device) cache.

    Without a mesh: plain jit on the default device. With one: parameters must already be
    placed by sharding.shard_params; inputs are placed by sharding.batch_spec, the program
    runs under the mesh (activation constraints active), the cache comes back sharded by
    sharding.cache_spec and the tokens replicated.
    """
    fn = functools.partial(_greedy, config=config, steps=steps)
    if mesh is None:
        out, last, cache = jax.jit(fn)(params, jnp.asarray(tokens), jnp.asarray(start))
        return np.asarray(out), np.asarray(last), cache
    batch = tokens.shape[0]
    rows = NamedSharding(mesh, sharding.batch_spec(mesh, batch))
    tokens = sharding.put(tokens, NamedSharding(mesh, sharding.batch_spec(mesh, batch, None)))
    start = sharding.put(start, rows)
    replicated = NamedSharding(mesh, P())
    out_shardings = (replicated, replicated, sharding.cache_shardings(mesh, batch, config))
    with sharding.use(mesh):
        out, last, cache = jax.jit(fn, out_shardings=out_shardings)(params, tokens, start)
    return sharding.to_host(out), sharding.to_host(last), cache
