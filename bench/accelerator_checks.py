"""Accelerator checks of the quantized paths that the CPU never runs, and the products' speed.

    python bench/accelerator_checks.py [--shape tiny|7b] [--repeats 20] [--out checks.json]

On a GPU or TPU the quantized products dequantize the whole weight inside the compiled step
(quantize._dequantize_then_dot, which XLA is expected to fuse into the dot), and an int8 KV
cache feeds the platform attention kernels; the test suite runs neither. This script, run
once on an accelerator host next to bench/accelerator.py:

  1. parity: a random tiny model in float32 (matmul precision "highest"), int8 and int4
     weights, against the float model holding the same weights dequantized: the logits of 64
     tokens must agree to float32 rounding; with bfloat16 compute, the difference is reported.
  2. int8 KV cache: a 600-token prompt prefilled in chunks of 256, then 8 decode steps, int8 cache
     against the compute-dtype cache: the max logit difference is reported (the CPU test holds
     it to 0.01 at 4K).
  3. products: one projection [out 11008, in 4096] (BlueLM-7B's up_proj) at 1, 4 and 16 rows,
     bfloat16 compute, over `--layers` stacked weights walked by one compiled scan (as a decode
     step walks its layers, so Python's dispatch is amortized): a bfloat16 weight, and each
     formulation of int8 and int4 (`formulations`: dequantize then dot, convert-dot-scale,
     multiply-reduce, and what the library picks). Median ms per product and the weight bytes
     read per second as a fraction of the device's copy bandwidth (bench/accelerator.py's measure).

`--shape tiny` shrinks the product to [256, 128] so that the test suite runs the script on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.accelerator import copy_bandwidth  # noqa: E402
from bluelm_jax import params as P  # noqa: E402
from bluelm_jax import quantize as Q  # noqa: E402
from bluelm_jax.config import BlueLMConfig  # noqa: E402
from bluelm_jax.model import forward, init_cache  # noqa: E402

TINY = BlueLMConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2)
PRODUCT_SHAPES = {"7b": (11008, 4096), "tiny": (256, 128)}  # [out, in]


def random_float_params(config: BlueLMConfig, seed: int = 0) -> dict:
    """The random float32 parameters of the CPU tests (bench/reference.py: q/k weights large, for
    sharp attention), on the default device."""
    from bench.reference import params_from_hf, random_hf_weights

    return params_from_hf(config, random_hf_weights(config, seed))


def dequantized(params: dict) -> dict:
    """The float tree (KERNEL layout) holding a quantized tree's weights as they dequantize."""
    tree: dict = {}
    for path, leaf in P.flatten(params):
        if path[-1] == P.QVALUE:
            parent = P.get_path(params, path[:-1])
            if parent[P.SCALE].ndim == 1:
                w = Q.dequantize_int8(leaf, parent[P.SCALE], 1)
            else:
                w = Q.dequantize_int4(leaf, parent[P.SCALE], 1, jnp.float32, parent.get(P.OFFSET))
            P.set_path(tree, (*path[:-1], P.KERNEL), w.T)  # [in, out]
        elif path[-1] not in (P.SCALE, P.OFFSET):
            P.set_path(tree, path, leaf)
    return tree


def parity(config: BlueLMConfig = TINY) -> dict:
    """Max |logits| difference of int8/int4 trees against their dequantized float trees."""
    params = random_float_params(config)
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 3, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(64), tokens.shape)
    run = jax.jit(forward, static_argnames=("config", "compute_dtype"))
    found = {}
    for kind in ("int8", "int4"):
        quantized = Q.quantize_params(jax.tree.map(lambda x: x, params), P.as_quantization(kind, config))
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            with jax.default_matmul_precision("highest"):
                ours = run(quantized, tokens, positions, config, compute_dtype=dtype)[0]
                reference = run(dequantized(quantized), tokens, positions, config, compute_dtype=jnp.float32)[0]
            found[f"{kind} {name}"] = float(jnp.max(jnp.abs(ours - reference)))
    return found


def int8_cache(config: BlueLMConfig = TINY, prompt: int = 600, chunk: int = 256, steps: int = 8) -> dict:
    """Max logit difference, int8 cache against the compute-dtype cache, over a chunked prefill
    and `steps` greedy decode steps (both fed the float cache's tokens)."""
    params = random_float_params(config)
    compute = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    tokens = jax.random.randint(jax.random.key(2), (1, prompt), 3, config.vocab_size)
    run = jax.jit(forward, static_argnames=("config", "compute_dtype"))

    def logits_with(cache_dtype):
        cache = init_cache(config, 1, prompt + steps, dtype=cache_dtype)
        out = []
        for at in range(0, prompt, chunk):
            piece = tokens[:, at:at + chunk]
            positions = jnp.arange(at, at + piece.shape[1])[None]
            logits, cache = run(params, piece, positions, config, cache=cache, compute_dtype=compute)
            out.append(logits)
        return out, cache

    reference, float_cache = logits_with(compute)
    ours, int8_cache_ = logits_with(jnp.int8)
    prefill_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(reference, ours))
    token = jnp.argmax(reference[-1][:, -1], -1)[:, None]
    decode_diff = 0.0
    for step in range(steps):
        positions = jnp.full((1, 1), prompt + step)
        a, float_cache = run(params, token, positions, config, cache=float_cache, compute_dtype=compute)
        b, int8_cache_ = run(params, token, positions, config, cache=int8_cache_, compute_dtype=compute)
        decode_diff = max(decode_diff, float(jnp.max(jnp.abs(a - b))))
        token = jnp.argmax(a[:, -1], -1)[:, None]
    return {"prefill max diff": prefill_diff, "decode max diff": decode_diff,
            "logit scale (std)": float(jnp.std(reference[-1])), "compute": jnp.dtype(compute).name}


def _median_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def formulations() -> dict:
    """name -> (product(x, *weights) -> float32 [rows, out], which weights: "bf16", "int8" or "int4")."""
    dims = (((1,), (1,)), ((), ()))
    return {
        "bf16 dot": (lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32), "bf16"),
        "int8 dequantize-then-dot": (lambda x, q, s: Q._dequantize_then_dot(x, q, s, 1, Q.dequantize_int8), "int8"),
        "int8 convert-dot-scale": (lambda x, q, s: jax.lax.dot_general(
            x, q.astype(x.dtype), dims, preferred_element_type=jnp.float32) * s, "int8"),
        "int8 multiply-reduce": (lambda x, q, s: jnp.sum(
            x.astype(jnp.float32)[:, None, :] * q.astype(jnp.float32)[None], axis=-1) * s, "int8"),
        "int8 library": (lambda x, q, s: Q.int8_product(x, q, s, 1), "int8"),
        "int4 dequantize-then-dot": (lambda x, q, s: Q._dequantize_then_dot(x, q, s, 1, Q.dequantize_int4), "int4"),
        "int4 multiply-reduce": (lambda x, q, s: Q._int4_accelerator_reduce(x, q, s, None), "int4"),
        "int4 library": (lambda x, q, s: Q.int4_product(x, q, s, 1), "int4"),
    }


def products(shape: tuple[int, int], layers: int, repeats: int, bandwidth: float) -> dict:
    """Each formulation of a [out, in] product over `layers` stacked weights (a lax.scan, so one
    call amortizes the dispatch as a decode step does): ms per product and the weight bytes read
    per second as a fraction of the copy bandwidth."""
    n_out, n_in = shape
    w = 0.02 * jax.random.normal(jax.random.key(3), (layers, n_out, n_in), jnp.float32)
    group = min(P.INT4_GROUP, n_in)
    weights = {"bf16": (w.astype(jnp.bfloat16),),
               "int8": jax.vmap(lambda w: Q.quantize_int8(w, 1))(w),
               "int4": jax.vmap(lambda w: Q.quantize_int4(w, 1, group))(w)}
    del w
    table = {}
    for rows in (1, 4, 16):
        x = jax.random.normal(jax.random.key(4), (rows, n_in), jnp.bfloat16)
        for name, (product, kind) in formulations().items():
            stacked = weights[kind]

            def over_layers(x, stacked, product=product):
                return jax.lax.scan(lambda carry, w: (carry, product(carry, *w)), x, stacked)[1]

            ms = _median_ms(jax.jit(over_layers), x, stacked, repeats=repeats) / layers
            nbytes = sum(a.nbytes for a in stacked) / layers
            table[f"{name}, {rows} rows"] = {"ms": round(ms, 4),
                                             "bandwidth fraction": round(nbytes / (ms * 1e-3) / bandwidth, 3)}
            print(f"  {name}, {rows} rows: {ms:.4f} ms, {table[f'{name}, {rows} rows']['bandwidth fraction']}",
                  flush=True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(PRODUCT_SHAPES), default="7b")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=16, help="stacked weights each timed call walks")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(f"devices: {jax.devices()}", flush=True)
    found: dict = {}
    for name, check in (("parity", parity), ("int8 cache", int8_cache)):
        try:
            found[name] = check()
        except Exception as e:  # noqa: BLE001 - report and go on: one run on a lent machine
            found[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"{name}: {json.dumps(found[name], indent=1)}", flush=True)
    try:
        bandwidth = copy_bandwidth(256 * 1024 * 1024 if args.shape == "7b" else 4 * 1024 * 1024)
        found["copy bandwidth GB/s"] = bandwidth / 1e9
        found["products"] = products(PRODUCT_SHAPES[args.shape], args.layers, args.repeats, bandwidth)
    except Exception as e:  # noqa: BLE001
        found["products"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(f"products: {json.dumps(found['products'], indent=1)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(found, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
