"""Test data of the sharded and multi-process tests, the same on every process: a config whose
heads split 8 ways, random parameters and prompts, and the library calls they compare.

test_sharding.py and the worker processes of test_multihost.py run the library's own
generation (`bluelm_jax.generate.generate` under `sharding.use(mesh)`) and its logits
(`BlueLM.logits`), so that the single-device, sharded and multi-process runs execute the
very programs users run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import sharding
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.generate import generate
from bluelm_jax.loading import BlueLM
from bluelm_jax.params import param_shapes

# Heads divisible by 8 (whole heads per device on tensor=8); 4 KV heads: on tensor=8 the
# KV projections and the cache stay replicated over tensor (the divisibility fallback).
CONFIG = BlueLMConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4)
NEW_TOKENS = 8


def random_params(config: BlueLMConfig, seed: int = 0) -> dict:
    """Host (numpy) parameters, the same values on every process: norm weights near 1, the
    rest std 0.08 (so that greedy outputs vary from token to token)."""
    rng = np.random.default_rng(seed)

    def leaf(shape):
        is_norm = len(shape) == 1
        value = 1 + 0.1 * rng.standard_normal(shape) if is_norm else 0.08 * rng.standard_normal(shape)
        return value.astype(np.float32)

    return jax.tree.map(leaf, param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))


def prompts(config: BlueLMConfig, batch: int = 8, seed: int = 1, longest: int = 24) -> list[list[int]]:
    """`batch` prompts of token ids, of different lengths (the first `longest`)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, longest + 1, batch)
    lengths[0] = longest
    return [rng.integers(4, config.vocab_size, n).tolist() for n in lengths]


def model_of(params: dict, mesh=None) -> BlueLM:
    """A model over `params` (placed on one device, or by sharding.shard_params on `mesh`), float32 products."""
    return BlueLM(CONFIG, None, params, jnp.dtype(jnp.float32), mesh=mesh)


def greedy_ids(model: BlueLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    """bluelm_jax.generate.generate, greedy, NEW_TOKENS at most, under the model's mesh."""
    with sharding.use(model.mesh):
        return generate(model, prompt_ids, max_new_tokens=NEW_TOKENS).ids


def prompt_logits(model: BlueLM, prompt_ids: list[list[int]]) -> np.ndarray:
    """BlueLM.logits [batch, longest, vocab] under the model's mesh, gathered to the host."""
    with sharding.use(model.mesh):
        return sharding.to_host(model.logits(prompt_ids))
