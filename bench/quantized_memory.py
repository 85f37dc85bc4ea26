"""Compiled memory of a 7B-shaped decode step, lowered from abstract shapes only (nothing allocated).

    python bench/quantized_memory.py [--shape 7b|tiny] [--kinds bf16 int8 int4] [--batch 1] [--device-gb 16]

One decode step (decode.decode_logits and a greedy argmax, bf16 compute, the cache donated as in
generation) is lowered with jax.ShapeDtypeStructs for the weights (checkpoint.abstract_params:
bf16, or int8 / int4 projections) and the KV cache (jax.eval_shape of model.init_cache) and
compiled; `memory_analysis()` gives the bytes of its arguments (weights + cache + token), outputs
and temporaries. Rows: each weight kind x a 2K cache (BlueLM-7B) and a 32K cache
(BlueLM-7B-32K), in bf16, and in int8 where model.init_cache has a working int8 cache
(bench/accelerator.py's `int8_cache_support`). The memory a step needs is arguments +
temporaries + the outputs not aliased to a donated argument; it fits a device of `--device-gb`
GB (10^9 bytes) when that total does. The analysis belongs to the backend that compiles: on
the CPU, quantized products are blocked loops (quantize.py) whose temporaries differ from the
products of a GPU or TPU (quantize.py: multiply-reduces and converted dots); bench/accelerator.py
runs this table on its device.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.accelerator import (COMPUTE_DTYPE, GB, KINDS, SHAPES, Runner, compile_jitted,  # noqa: E402
                               compiled_memory, int8_cache_support, log, quantization_of_kind)
from bluelm_jax import decode  # noqa: E402
from bluelm_jax.checkpoint import abstract_params  # noqa: E402
from bluelm_jax.config import BlueLMConfig  # noqa: E402
from bluelm_jax.model import init_cache  # noqa: E402

# shape -> ((config, cache slots), ...): the 2K model with a 2K cache, the 32K model with a 32K cache
CACHES = {"7b": ((SHAPES["7b"][0], 2048), (SHAPES["7b"][1], 32768)),
          "tiny": ((SHAPES["tiny"][0], 64), (SHAPES["tiny"][1], 256))}


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(2,))
def decode_step(params: dict, token: jax.Array, cache, *, config):
    """One greedy decode step: token [batch] -> (next token [batch], cache)."""
    logits, cache = decode.decode_logits(params, token, cache, config, COMPUTE_DTYPE)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def step_memory(kind: str, config: BlueLMConfig, cache_len: int, cache_dtype, batch: int = 1,
                options: Optional[dict] = None) -> dict:
    """The compiled memory of one decode step of `kind` weights with a cache of `cache_len` slots."""
    params = abstract_params(config, jnp.bfloat16, None, quantization_of_kind(kind))
    cache = jax.eval_shape(lambda: init_cache(config, batch, cache_len, dtype=cache_dtype))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    memory = compiled_memory(compile_jitted(decode_step, params, token, cache, options=options, config=config)[0])
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    parts = [memory[k] for k in ("argument", "output", "temp")]
    total = None if None in parts else sum(parts) - (memory["alias"] or 0)
    return {"kind": kind, "cache_len": cache_len, "cache_dtype": jnp.dtype(cache_dtype).name,
            "batch": batch, "weight_bytes": weights, "cache_bytes": cache_bytes, **memory, "total": total,
            "backend": jax.default_backend()}


def memory_rows(shape: str, kinds, runner: Runner | None = None, int8_cache: bool | None = None,
                batch: int = 1, options: Optional[dict] = None) -> list[dict]:
    """`step_memory` for each kind x cache (x cache dtype), each in `runner` (failures and an
    exhausted budget leave a row out)."""
    runner = runner or Runner(float("inf"))
    if int8_cache is None:
        available, note = int8_cache_support(options)
        int8_cache = available
        log(f"int8 cache {'available' if available else 'not available'}: {note}")
    cache_dtypes = (COMPUTE_DTYPE, jnp.int8) if int8_cache else (COMPUTE_DTYPE,)
    rows = []
    for config, cache_len in CACHES[shape]:
        for cache_dtype in cache_dtypes:
            for kind in kinds:
                row = runner.run(f"decode-step memory: {kind} weights, {cache_len} slots {jnp.dtype(cache_dtype).name}",
                                 "memory-table", lambda: step_memory(kind, config, cache_len, cache_dtype, batch, options))
                if row is not None:
                    rows.append(row)
    return rows


def format_rows(rows: list[dict], device_gb: float = 16.0) -> str:
    """The rows as a text table, with whether each step fits a device of `device_gb` GB."""
    header = ("weights", "cache", "weights GB", "cache GB", "argument GB", "output GB", "alias GB", "temp GB",
              "total GB", f"fits {device_gb:g} GB")
    gb = lambda v: "n/a" if v is None else f"{v / GB:.3g}"  # noqa: E731
    body = [(r["kind"], f"{r['cache_len']} x {r['cache_dtype']}", gb(r["weight_bytes"]), gb(r["cache_bytes"]),
             gb(r["argument"]), gb(r["output"]), gb(r["alias"]), gb(r["temp"]), gb(r["total"]),
             "n/a" if r["total"] is None else ("yes" if r["total"] <= device_gb * GB else "no")) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    backend = rows[0]["backend"] if rows else jax.default_backend()
    return "\n".join([f"compiled decode-step memory (batch {rows[0]['batch'] if rows else 1}, bf16 compute), "
                      f"memory_analysis of the {backend} backend:", line(header),
                      "-+-".join("-" * w for w in widths), *(line(b) for b in body)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=tuple(CACHES), default="7b")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device-gb", type=float, default=16.0)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.device_gb <= 0:
        ap.error("--batch and --device-gb must be positive")
    runner = Runner(float("inf"))
    rows = memory_rows(args.shape, list(dict.fromkeys(args.kinds)), runner=runner, batch=args.batch)
    log(format_rows(rows, args.device_gb))
    return 1 if runner.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
