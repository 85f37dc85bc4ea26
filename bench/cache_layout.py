"""Why the KV cache is one [batch, kv_heads, slots, head_dim] buffer per layer: decode attention
over every layer in three cache layouts, float32 on CPU, side by side.

    python -m bench.cache_layout [--shape medium] [--batch 16] [--slots 512] [--repeats 5]

One query token per row attends over all `--slots` slots of every layer (scores, softmax,
values: `attention.dot_product_attention`, as a decode step calls it), the layers one after
another, compiled as one program:
    per-layer [batch, kv_heads, slots, head_dim]   the project's cache (model.KVCache)
    stacked [layers, batch, kv_heads, slots, ...]  the same layout in one array, sliced per layer
    stacked [layers, batch, slots, kv_heads, ...]  the layout the cache had before
Each row prints the median time, the ratio to the project's layout, the XLA temporaries of
the compiled program, and the fraction of the read roofline (the keys and values read once,
at the bandwidth of a compiled XLA sum). Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.decode import SHAPES, read_bandwidth  # noqa: E402
from bluelm_jax.attention import attention_mask, dot_product_attention  # noqa: E402


def per_layer(q, ks, vs, mask):
    """ks, vs: tuples of [batch, kv_heads, slots, head_dim]."""
    return sum(dot_product_attention(q, k, v, mask) for k, v in zip(ks, vs))


def stacked(q, k, v, mask):
    """k, v: [layers, batch, kv_heads, slots, head_dim], each layer a slice."""
    return sum(dot_product_attention(q, k[layer], v[layer], mask) for layer in range(k.shape[0]))


def stacked_slots_first(q, k, v, mask):
    """k, v: [layers, batch, slots, kv_heads, head_dim] (the transpose to heads-first is XLA's)."""
    return sum(dot_product_attention(q, k[layer].swapaxes(1, 2), v[layer].swapaxes(1, 2), mask)
               for layer in range(k.shape[0]))


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="medium")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    c = SHAPES[args.shape]
    layers, b, s, kvh, d = c.num_hidden_layers, args.batch, args.slots, c.num_key_value_heads, c.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, 1, c.num_attention_heads, d), np.float32))  # [batch, 1, heads, head_dim]
    k = rng.standard_normal((layers, b, kvh, s, d), np.float32)
    v = rng.standard_normal((layers, b, kvh, s, d), np.float32)
    mask = attention_mask(jnp.asarray([s - 1], jnp.int32), s, jnp.zeros((b,), jnp.int32))  # [batch, 1, slots]
    cases = [
        ("per-layer [batch, kv_heads, slots, head_dim]", per_layer,
         (q, tuple(jnp.asarray(x) for x in k), tuple(jnp.asarray(x) for x in v), mask)),
        ("stacked [layers, batch, kv_heads, slots, ...]", stacked, (q, jnp.asarray(k), jnp.asarray(v), mask)),
        ("stacked [layers, batch, slots, kv_heads, ...]", stacked_slots_first,
         (q, jnp.asarray(k.swapaxes(2, 3)), jnp.asarray(v.swapaxes(2, 3)), mask)),
    ]
    del k, v
    read = read_bandwidth()
    kv_bytes = 2 * layers * b * kvh * s * d * 4
    print(f"{args.shape}: {layers} layers, batch {b}, {s} slots, {kvh} KV heads x {d}; keys and values "
          f"{kv_bytes / 2**20:.0f} MiB; XLA read bandwidth {read / 1e9:.1f} GB/s; median of {args.repeats}")
    print(f"{'cache layout':<46} {'ms':>7} {'vs per-layer':>12} {'temp MiB':>9} {'roofline':>9}")
    base = None
    for name, fn, fn_args in cases:
        fn = jax.jit(fn)
        temp = fn.lower(*fn_args).compile().memory_analysis().temp_size_in_bytes
        seconds = median_seconds(fn, fn_args, args.repeats)
        base = base or seconds
        print(f"{name:<46} {seconds * 1e3:>7.1f} {seconds / base:>11.2f}x {temp / 2**20:>9.0f} "
              f"{kv_bytes / read / seconds:>9.2f}")


if __name__ == "__main__":
    main()
