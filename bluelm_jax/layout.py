"""The projection layout of loaded parameters: which one `load()` picks, and moving a tree
between the two (params.py: KERNEL [in, out], WEIGHT [out, in]).

Checkpoints, training and accelerators use KERNEL. WEIGHT is for bfloat16 weights under
float32 compute on CPU, where every product is `model._bf16_weight_matmul` and XLA's CPU
bfloat16 dot reads a row-major [out, in] weight about twice as fast at decode's few rows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import params as P
from bluelm_jax.checkpoint import adopts_host_buffers, host_transpose
from bluelm_jax.model import keeps_bf16_weight
from bluelm_jax.sharding import transposed_sharding


def inference_layout(param_dtype: Any, compute_dtype: Any) -> str:
    """WEIGHT where the products run as bfloat16 dots with a float32 result (bfloat16 weights,
    float32 compute, CPU), else KERNEL."""
    return P.WEIGHT if keeps_bf16_weight(param_dtype, compute_dtype) else P.KERNEL


@functools.lru_cache(maxsize=None)
def _compiled_transpose(out_sharding: jax.sharding.Sharding):
    return jax.jit(jnp.transpose, out_shardings=out_sharding)


def transposed(leaf: jax.Array) -> jax.Array:
    """The transpose of a 2-D array, placed by `transposed_sharding`. On CPU devices each shard
    is transposed on the host into a buffer the device adopts (nothing compiled, no copy);
    elsewhere by XLA."""
    sharding = transposed_sharding(leaf.sharding)
    if not all(adopts_host_buffers(device) for device in leaf.sharding.device_set):
        return _compiled_transpose(sharding)(leaf)
    shards = [jax.device_put(host_transpose(np.asarray(shard.data)), shard.device) for shard in leaf.addressable_shards]
    return jax.make_array_from_single_device_arrays(leaf.shape[::-1], sharding, shards)


def to_layout(params: dict, layout: str) -> dict:
    """Moves `params` to `layout` in place and returns it: each projection's leaf is replaced by
    its transpose under its other name (q_proj/kernel [in, out] <-> q_proj/weight [out, in]).

    One leaf at a time, placed as the old one was (its mesh axes swapped), and the old leaf is
    dropped before the next is made, so memory peaks at one leaf above the parameters (when
    nothing else holds them)."""
    source = P.layout_of(params)
    if P.check_layout(layout) == source:
        return params
    for path in [path for path, _ in P.flatten(params)]:  # paths only: a list of leaves would keep them all
        moved = P.path_in(path, layout)
        if moved != path:
            parent = P.get_path(params, path[:-1])
            leaf = parent.pop(path[-1])  # [in, out] <-> [out, in]
            parent[moved[-1]] = transposed(leaf)
            del leaf
    return params
