"""Benchmark: prefill 32,768 tokens with a small ntkmixed (32K) model, then decode at that length.

    python bench/long_context.py [--tokens 32768] [--layers 1] [--heads 2] [--hidden 256]
                                 [--attention auto|chunked|dense] [--decode-steps 8]

Runs the prefill the way generation does (`forward` with a preallocated KV cache, last-token
logits only) and reports: wall time (compile excluded), the XLA temp memory of the compiled
prefill (`memory_analysis`), the process's peak RSS (CPU) or the device's peak bytes
(GPU/TPU), and next to them what the dense [T, T] float32 scores alone would need for this
shape and for BlueLM-7B (32 heads). Then decodes a few tokens at position ~32K, where the
decode attention reads only the filled part of the cache.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bluelm_jax.config import NTKMIXED_32K, BlueLMConfig  # noqa: E402
from bluelm_jax.model import forward, init_cache  # noqa: E402
from bluelm_jax.params import param_shapes  # noqa: E402

GiB = 1024 ** 3


def peak_memory_bytes() -> tuple[str, int]:
    if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        return "device peak", int(stats.get("peak_bytes_in_use", 0))
    return "process peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--attention", default="auto", choices=("auto", "chunked", "dense"))
    ap.add_argument("--decode-steps", type=int, default=8)
    args = ap.parse_args(argv)

    config = BlueLMConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, rope_scaling=NTKMIXED_32K)
    n, dtype = args.tokens, jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if n > config.context_length:
        ap.error(f"--tokens {n} exceeds the 32K context ({config.context_length})")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.08 * rng.standard_normal(s), dtype), param_shapes(config),
                          is_leaf=lambda s: isinstance(s, tuple))
    cache_len = n + max(args.decode_steps, 1)
    tokens = jnp.asarray(rng.integers(4, config.vocab_size, (1, n)), jnp.int32)
    positions = jnp.arange(n, dtype=jnp.int32)[None]

    @jax.jit
    def prefill(params, tokens, positions):
        cache = init_cache(config, 1, cache_len, dtype=dtype)
        return forward(params, tokens, positions, config, cache=cache, compute_dtype=dtype, last_only=True,
                       attention_impl=args.attention)

    @functools.partial(jax.jit, donate_argnums=(2,))  # the cache is updated in place, as in generate
    def decode(params, token, cache):
        positions = (cache.index - cache.start)[:, None]
        logits, cache = forward(params, token[:, None], positions, config, cache=cache, compute_dtype=dtype)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    print(f"backend {jax.default_backend()}, {jnp.dtype(dtype).name}; model: {args.layers} layer(s), "
          f"{args.heads} heads x head_dim {config.head_dim}, ntkmixed factor 16; prompt {n:,} tokens")
    t0 = time.perf_counter()
    compiled = prefill.lower(params, tokens, positions).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    t0 = time.perf_counter()
    logits, cache = compiled(params, tokens, positions)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    assert np.isfinite(np.asarray(logits)).all()

    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    token, cache = decode(params, token, cache)  # compile
    token.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.decode_steps - 1):
        token, cache = decode(params, token, cache)
    token.block_until_ready()
    decode_ms = 1000 * (time.perf_counter() - t0) / max(args.decode_steps - 1, 1)

    kind, peak = peak_memory_bytes()
    cache_bytes = sum(x.nbytes for x in cache.k + cache.v)
    dense_here = args.heads * n * n * 4  # one layer's [heads, T, T] float32 scores, batch 1
    dense_7b = 32 * n * n * 4
    print(f"prefill: {prefill_s:.1f} s ({n / prefill_s:,.0f} tokens/s), compile {compile_s:.1f} s")
    print(f"decode at position {int(cache.index):,}: {decode_ms:.1f} ms/token")
    print(f"XLA temp memory of the compiled prefill: {temp / GiB:.3f} GiB")
    print(f"{kind}: {peak / GiB:.2f} GiB (KV cache {cache_bytes / GiB:.3f} GiB, weights "
          f"{sum(x.nbytes for x in jax.tree.leaves(params)) / GiB:.3f} GiB)")
    print(f"dense [T, T] float32 scores would need: {dense_here / GiB:.1f} GiB per layer for this shape "
          f"({args.heads} heads), {dense_7b / GiB:.0f} GiB per layer for BlueLM-7B (32 heads)")
    print(f"ratio: XLA temp / dense scores = {temp / dense_here:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
