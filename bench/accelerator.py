"""Accelerator benchmark: a 7B-shaped random BlueLM in bf16, int8 and int4 weights, on one device.

    python bench/accelerator.py [--shape 7b|tiny] [--kinds bf16 int8 int4] [--batches 1 16]
                                [--new-tokens N] [--prefill-len 2048] [--long-prefill-len 32768]
                                [--budget-s 280] [--no-memory-table] [--out results.json]

Meant for one GPU or TPU host and at most five minutes; `--shape tiny` runs in seconds on a CPU
(the test suite does, so the script cannot rot). Every measurement runs in its own try/except:
a failure prints one line and the rest goes on; a measurement that would not end within
`--budget-s` (judged by the longest one of its category so far) is skipped and listed. A summary
table ends the output; `--out` also writes it as JSON.

What it measures, per weight kind (bf16: float projections; int8: per output channel; int4:
groups of 128; embeddings, norms and lm_head stay bf16), with random weights generated on the
device leaf by leaf (a quantized kind quantizes each projection right after generating it,
quantize.quantize_leaf, so the device holds at most one float leaf above the quantized tree):

  * decode tokens/s at each `--batches` size: the project's compiled decode loop
    (decode.decode_loop, greedy, bf16 compute, no stop id) after the project's compiled prefill
    (decode.prefill) of `--prefill-len` tokens, so the cache holds ~2K filled slots. The batch-1
    prefill state is tiled to the larger batches. Each program is lowered and compiled first
    (compile time reported apart), run once, then timed (best of two). Weight bytes read per step: every parameter but
    the embedding table (of which a step reads one row per token). HBM roofline fraction =
    weight bytes per step x steps/s / the device's copy bandwidth, measured here (an elementwise
    jitted x + 1 over a large float32 array, the read and the write counted, STREAM style). The
    KV cache read per step (estimated from the filled slots) is reported next to it, and the
    fraction that includes it; at batch 16 and 2K slots the cache outweighs the weights.
  * prefill tokens/s of `--prefill-len` tokens at batch 1 (decode.prefill, compile excluded).
  * a `--long-prefill-len` prefill at batch 1 with the 32K model (preset bluelm-7b-base-32k; its
    weights have the same shapes, so the same tree serves), through model.init_cache + forward,
    with an int8 KV cache when the library has one. That is detected at run time: init_cache must
    accept dtype=jnp.int8 AND a tiny model's logits through an int8 cache must stay within 5%
    (relative L2) of a float cache's (the unextended init_cache takes the dtype but casts keys
    to int8, which this check catches). Otherwise the prefill runs with a bf16 cache and the
    summary says "int8 cache not available" with the reason.
  * peak device memory: memory_stats()["peak_bytes_in_use"] ("n/a" where the backend has none,
    e.g. the CPU). XLA cannot reset that peak, so the kinds run in increasing weight size
    (int4, int8, bf16), one kind's weights on the device at a time, and a kind's figure is the
    process peak after its first block (weights, prefill, decode at the first batch size), which
    is then its own. The later blocks (decode at the other batch sizes, the long prefill) generate
    the kind's weights again and give their memory as the compiled memory analysis of their
    programs (arguments, outputs, temporaries) in the JSON.

Order, most important first, so that a short budget drops the least: every kind's first block
(which gives the int8/bf16 ratio at batch 1), then the other batch sizes, then the long prefills,
then the memory table.
  * ratios: int8/bf16 and int4/bf16 decode tokens/s at batch 1 (the issue's accelerator claim:
    int8 >= 1.6x bf16).

With time left (and unless `--no-memory-table`), the compiled memory of a decode step lowered
from abstract shapes (bench/quantized_memory.py) is tabled for this backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bluelm_jax import decode, sampling  # noqa: E402
from bluelm_jax import params as P  # noqa: E402
from bluelm_jax import quantize as Q  # noqa: E402
from bluelm_jax.command_line import one_line  # noqa: E402
from bluelm_jax.config import NTKMIXED_32K, BlueLMConfig, preset  # noqa: E402
from bluelm_jax.model import forward, init_cache  # noqa: E402

GB = 1e9
KINDS = ("bf16", "int8", "int4")
WEIGHT_ORDER = {"int4": 0, "int8": 1, "bf16": 2}  # increasing weight bytes: the order the kinds run in
# the test shape: one layer, one head of 128 (int4 groups of 128 divide every input size)
TINY_SHAPES = tuple(BlueLMConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, rope_scaling=scaling)
                    for scaling in (None, NTKMIXED_32K))
# shape -> (the 2K model, the 32K model)
SHAPES = {"7b": (preset("bluelm-7b-base"), preset("bluelm-7b-base-32k")), "tiny": TINY_SHAPES}
# per-shape defaults of the lengths: (new tokens, prefill, long prefill, copy MiB)
LENGTH_DEFAULTS = {"7b": (128, 2048, 32768, 2048), "tiny": (8, 64, 256, 16)}
INIT_STD = 0.02
INT8_CACHE_TOLERANCE = 0.05  # relative L2 error of a tiny model's logits, int8 cache vs float cache
STOP_SLOTS = 8
COMPUTE_DTYPE = jnp.bfloat16
# --fast-compile: XLA's quick code generation (tests; the timings are then not representative)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def log(*parts) -> None:
    print(*parts, flush=True)


def quantization_of_kind(kind: str) -> Optional[P.Quantization]:
    return None if kind == "bf16" else P.Quantization(kind)


# --------------------------------------------------------------------------- the run's bookkeeping


class Runner:
    """Runs measurements in try/except within a time budget; keeps the errors and the skips."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.longest: dict[str, float] = {}  # category -> longest duration so far
        self.errors: list[str] = []
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, category: str, fn: Callable[[], Any]) -> Any:
        """fn(), or None when it failed (one line printed) or would overrun the budget (skipped)."""
        estimate = self.longest.get(category, max(self.longest.values(), default=0.0))
        if self.elapsed() + estimate > self.budget_s:
            self.skipped.append(name)
            log(f"[{self.elapsed():6.1f}s] skip {name}: about {estimate:.0f} s would pass the {self.budget_s:.0f} s budget")
            return None
        log(f"[{self.elapsed():6.1f}s] {name} ...")
        start = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a benchmark goes on after a failed measurement
            self.errors.append(f"{name}: {type(e).__name__}: {one_line(e)[:500]}")
            log(f"[{self.elapsed():6.1f}s] FAILED {name}: {type(e).__name__}: {one_line(e)[:500]}")
            return None
        finally:
            took = time.perf_counter() - start
            self.longest[category] = max(self.longest.get(category, 0.0), took)


def peak_device_bytes() -> Optional[int]:
    """The device's peak bytes in use so far, or None where the backend keeps no such statistic."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def free(tree) -> None:
    """Deletes every device array of `tree` now (not when Python drops the last reference)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


# --------------------------------------------------------------------------- bandwidth


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a jitted elementwise x + 1 over a float32 array of `nbytes` (read + write)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    add_one = jax.jit(lambda a: a + 1)
    add_one(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        y = add_one(x)
        y.block_until_ready()
        best = min(best, time.perf_counter() - t)
        y.delete()
    x.delete()
    return 2 * nbytes / best


# --------------------------------------------------------------------------- random weights on device


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_leaf(key: jax.Array, shape: tuple, dtype) -> jax.Array:
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _constant_leaf(shape: tuple, value: float, dtype) -> jax.Array:
    return jnp.full(shape, value, dtype)


def random_params(config: BlueLMConfig, quantization: Optional[P.Quantization], seed: int = 0,
                  dtype=jnp.bfloat16) -> dict:
    """A random KERNEL-layout tree generated on the default device one leaf at a time: normal(0.02)
    matrices, unit norm weights, zero biases; each projection that `quantization` covers is
    quantized (quantize.quantize_leaf) before the next leaf is generated."""
    tree: dict = {}
    key = jax.random.key(seed)
    for i, leaf in enumerate(P.leaves(config, P.KERNEL)):
        if leaf.axes == ("norm",):
            value = _constant_leaf(leaf.shape, 0.0 if leaf.path[-1] == "bias" else 1.0, dtype)
        else:
            value = _normal_leaf(jax.random.fold_in(key, i), leaf.shape, dtype)
        P.set_path(tree, leaf.path, value)
        if quantization is not None:
            Q.quantize_leaf(tree, leaf.path, quantization)
            jax.block_until_ready(P.get_path(tree, leaf.path[:-1]))  # the float leaf is gone before the next
    return jax.block_until_ready(tree)


def weight_bytes_per_step(params: dict) -> int:
    """Bytes a decode step reads from the weights: every leaf but the embedding table."""
    return sum(leaf.nbytes for path, leaf in P.flatten(params) if path[:2] != ("model", "embed_tokens"))


def tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- decode and prefill


def greedy_static(config: BlueLMConfig) -> decode.Static:
    sampler = sampling.SamplerSettings(do_sample=False, top_k=0, vocab_limit=config.vocab_size)
    return decode.Static(config=config, sampler=sampler, compute_dtype=COMPUTE_DTYPE, pad_id=config.pad_token_id)


def no_stop_request(batch: int, limit: int) -> decode.Request:
    """Greedy rows that stop only at `limit` tokens (no stop id: -1 everywhere)."""
    return decode.Request(sampler=sampling.make_params(batch), limit=np.full((batch,), limit, np.int32),
                          stop_ids=np.full((STOP_SLOTS,), -1, np.int32))


@functools.partial(jax.jit, static_argnums=1)
def tile_state(state: decode.DecodeState, batch: int) -> decode.DecodeState:
    """A fresh copy of a batch-1 state with its rows repeated `batch` times (scalars kept), to donate."""
    def tile(x):
        if x.ndim == 0:
            return jnp.copy(x)
        return jnp.repeat(x, batch, axis=0) if batch > 1 else jnp.copy(x)
    return jax.tree.map(tile, state)


def compile_jitted(jitted, *args, options: Optional[dict] = None, **statics) -> tuple[Any, float]:
    """(jitted lowered for `args` and compiled with XLA `options`, the seconds that took)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args, **statics).compile(compiler_options=options)
    return compiled, time.perf_counter() - t


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(best seconds of `repeats` calls of fn, the last result), each call waited for."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if out is not None:
            free(out)
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


@dataclasses.dataclass
class PrefillResult:
    seconds: float
    tokens_per_s: float
    compile_s: float
    memory: dict  # compiled_memory of the prefill
    state: decode.DecodeState  # the batch-1 state after the prompt (the decode prototype)
    rerun: Callable[[dict], decode.DecodeState]  # the compiled prefill again, for weights of the same shapes


def run_prefill(params: dict, config: BlueLMConfig, prefill_len: int, width: int, repeats: int = 2,
                options: Optional[dict] = None) -> PrefillResult:
    """decode.prefill of one random prompt of `prefill_len` tokens into a cache of prefill_len + width slots."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, config.vocab_size, (1, prefill_len)).astype(np.int32)
    inputs = (params, tokens, np.zeros((1,), np.int32), no_stop_request(1, width), sampling.row_keys(0, 1))
    compiled, compile_s = compile_jitted(decode.prefill, *inputs, options=options, static=greedy_static(config),
                                         cache_len=prefill_len + width, width=width)
    free(jax.block_until_ready(compiled(*inputs)))  # a first run: buffers and kernels warmed up
    seconds, state = timed(lambda: compiled(*inputs), repeats)
    return PrefillResult(seconds, prefill_len / seconds, compile_s, compiled_memory(compiled), state,
                         lambda new_params: compiled(new_params, *inputs[1:]))


def kv_bytes_per_step(state: decode.DecodeState, batch: int, filled: float) -> float:
    """Estimated KV cache bytes a decode step reads: the cache arrays (rank >= 3) of the batch-1
    `state`, times `batch`, times the filled fraction `filled` (attention reads the filled blocks)."""
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state.cache) if x.ndim >= 3)
    return batch * cache_bytes * filled


def run_decode(params: dict, config: BlueLMConfig, prototype: decode.DecodeState, batch: int, width: int,
               repeats: int = 2, options: Optional[dict] = None) -> dict:
    """Times decode.decode_loop from `prototype` tiled to `batch` rows until `width` tokens a row."""
    request, until = no_stop_request(batch, width), np.int32(width)
    first_step = int(prototype.step)
    tiled = jax.eval_shape(lambda state: tile_state(state, batch), prototype)  # shapes only: nothing allocated
    compiled, compile_s = compile_jitted(decode.decode_loop, params, tiled, request, until, options=options,
                                         static=greedy_static(config))

    def call():
        state = jax.block_until_ready(tile_state(prototype, batch))
        t = time.perf_counter()
        state = jax.block_until_ready(compiled(params, state, request, until))
        return time.perf_counter() - t, state

    free(call()[1])  # a first run: buffers and kernels warmed up
    best, steps = float("inf"), 0
    for _ in range(repeats):
        seconds, state = call()
        steps = int(state.step) - first_step
        free(state)
        best = min(best, seconds)
    if steps < 1:
        raise RuntimeError(f"the decode loop took {steps} steps")
    return {"seconds_per_step": best / steps, "steps_per_s": steps / best, "tokens_per_s": batch * steps / best,
            "steps": steps, "compile_s": compile_s, "compiled_memory": compiled_memory(compiled)}


# --------------------------------------------------------------------------- int8 KV cache detection


def int8_cache_support(options: Optional[dict] = None) -> tuple[bool, str]:
    """(whether model.init_cache(dtype=jnp.int8) gives a working int8 cache, why not / what was checked).

    A tiny float32 model whose values are small (v_proj scaled by 0.1, under the 0.5 that an int8
    cast rounds to 0) and whose attention output weighs (o_proj scaled by 100): a cache that only
    casts to int8 moves its logits by about 50% (relative L2), a bf16 cache by 0.1%, a cache
    quantized with scales by well under INT8_CACHE_TOLERANCE."""
    config = TINY_SHAPES[0]
    params = random_params(config, None, dtype=jnp.float32)
    for layer in params["model"]["layers"].values():
        layer["self_attn"]["v_proj"]["kernel"] = layer["self_attn"]["v_proj"]["kernel"] * 0.1
        layer["self_attn"]["o_proj"]["kernel"] = layer["self_attn"]["o_proj"]["kernel"] * 100
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, config.vocab_size, (1, 16)), jnp.int32)

    def logits(cache_dtype):
        def run(params):
            cache = init_cache(config, 1, 32, dtype=cache_dtype)
            return forward(params, tokens, jnp.arange(16, dtype=jnp.int32)[None], config, cache=cache)[0]
        return np.asarray(compile_jitted(jax.jit(run), params, options=options)[0](params), np.float64)

    reference = logits(jnp.float32)
    try:
        quantized = logits(jnp.int8)
    except Exception as e:  # noqa: BLE001 - any failure means: no int8 cache
        return False, f"init_cache(dtype=int8) or a forward pass through it failed: {type(e).__name__}: {one_line(e)[:200]}"
    error = float(np.linalg.norm(quantized - reference) / np.linalg.norm(reference))
    if not np.isfinite(error) or error > INT8_CACHE_TOLERANCE:
        return False, (f"init_cache accepts dtype=int8 but a tiny model's logits through it are {error:.2f} "
                       f"(relative L2) from a float cache's: keys and values are cast, not quantized")
    return True, f"tiny-model logits within {error:.4f} (relative L2) of a float cache"


# --------------------------------------------------------------------------- long prefill


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "cache_dtype"))
def long_prefill(params: dict, tokens: jax.Array, *, config: BlueLMConfig, cache_len: int, cache_dtype):
    """A fresh cache of `cache_len` slots in `cache_dtype` filled with tokens [batch, seq]: the greedy
    next token [batch] and the cache (kept, as generation keeps it)."""
    batch, seq = tokens.shape
    cache = init_cache(config, batch, cache_len, dtype=cache_dtype)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
    logits, cache = forward(params, tokens, positions, config, cache=cache, compute_dtype=COMPUTE_DTYPE,
                            last_only=True)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def compiled_memory(compiled) -> dict:
    """argument / output / temp bytes of a compiled program's memory analysis (None where absent)."""
    analysis = compiled.memory_analysis()
    names = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
             "temp": "temp_size_in_bytes", "alias": "alias_size_in_bytes"}
    return {key: (int(getattr(analysis, attr)) if analysis is not None and hasattr(analysis, attr) else None)
            for key, attr in names.items()}


def run_long_prefill(params: dict, config: BlueLMConfig, length: int, cache_dtype, repeats: int = 1,
                     options: Optional[dict] = None) -> dict:
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, config.vocab_size, (1, length)), jnp.int32)
    compiled, compile_s = compile_jitted(long_prefill, params, tokens, options=options, config=config,
                                         cache_len=length, cache_dtype=cache_dtype)
    memory = compiled_memory(compiled)
    seconds, out = timed(lambda: compiled(params, tokens), repeats)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(out[1]) if x.ndim >= 1)
    free(out)
    return {"tokens": length, "seconds": seconds, "tokens_per_s": length / seconds, "compile_s": compile_s,
            "cache_dtype": jnp.dtype(cache_dtype).name, "cache_bytes": cache_bytes, "compiled_memory": memory}


# --------------------------------------------------------------------------- the run


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps + 1 per row (default 128; tiny 8)")
    ap.add_argument("--prefill-len", type=int, default=None, help="the prompt before decode (default 2048; tiny 64)")
    ap.add_argument("--long-prefill-len", type=int, default=None, help="default 32768; tiny 256; 0 skips it")
    ap.add_argument("--copy-mib", type=int, default=None, help="array size of the bandwidth copy (default 2048; tiny 16)")
    ap.add_argument("--budget-s", type=float, default=280.0, help="stop starting measurements past this (default 280)")
    ap.add_argument("--no-memory-table", action="store_true", help="skip the abstract decode-step memory table")
    ap.add_argument("--fast-compile", action="store_true",
                    help="quick XLA code generation (for tests: faster compiles, timings not representative)")
    ap.add_argument("--out", default=None, help="also write the summary as JSON here")
    args = ap.parse_args(argv)
    new_tokens, prefill_len, long_len, copy_mib = LENGTH_DEFAULTS[args.shape]
    args.new_tokens = new_tokens if args.new_tokens is None else args.new_tokens
    args.prefill_len = prefill_len if args.prefill_len is None else args.prefill_len
    args.long_prefill_len = long_len if args.long_prefill_len is None else args.long_prefill_len
    args.copy_mib = copy_mib if args.copy_mib is None else args.copy_mib
    long_context = SHAPES[args.shape][1].context_length
    if args.new_tokens < 2:
        ap.error(f"--new-tokens must be at least 2 (one prefill token and one decode step), got {args.new_tokens}")
    if args.prefill_len < 1 or args.copy_mib < 1 or min(args.batches) < 1:
        ap.error("--prefill-len, --copy-mib and --batches must be positive")
    if not 0 <= args.long_prefill_len <= long_context:
        ap.error(f"--long-prefill-len must be in [0, {long_context}] (the 32K model's context), "
                 f"got {args.long_prefill_len}")
    args.options = FAST_COMPILE if args.fast_compile else None
    args.kinds = list(dict.fromkeys(args.kinds))
    args.batches = list(dict.fromkeys(args.batches))
    return args


def record_decode(entry: dict, result: dict, prototype: decode.DecodeState, batch: int, args, bandwidth) -> None:
    """Adds the bytes per step and the roofline fractions to a `run_decode` result; stores and prints it."""
    cache_len = args.prefill_len + args.new_tokens
    result["cache_len"] = cache_len
    result["weight_bytes_per_step"] = entry["weight_bytes_per_step"]
    result["kv_bytes_per_step"] = kv_bytes_per_step(prototype, batch, (args.prefill_len + args.new_tokens / 2) / cache_len)
    if bandwidth:
        result["hbm_fraction"] = entry["weight_bytes_per_step"] * result["steps_per_s"] / bandwidth
        result["hbm_fraction_with_kv"] = ((entry["weight_bytes_per_step"] + result["kv_bytes_per_step"])
                                          * result["steps_per_s"] / bandwidth)
    entry["decode"][str(batch)] = result
    log(f"  decode batch {batch}: {result['tokens_per_s']:,.1f} tokens/s, {result['seconds_per_step'] * 1e3:.2f} ms/step, "
        f"HBM fraction {result.get('hbm_fraction', float('nan')):.2f} "
        f"(with KV {result.get('hbm_fraction_with_kv', float('nan')):.2f}), compile {result['compile_s']:.1f} s")


def measure_kind(runner: Runner, kind: str, config: BlueLMConfig, args, summary: dict) -> Optional[Callable]:
    """The first block of a kind: its weights, the prefill, decode at the first batch size, and the peak
    device memory after them. Returns the compiled prefill (params -> state) for `measure_more_batches`."""
    entry = summary["kinds"].setdefault(kind, {"decode": {}})
    params = runner.run(f"{kind}: random weights", "weights", lambda: random_params(config, quantization_of_kind(kind)))
    if params is None:
        return None
    entry["weight_bytes"] = tree_bytes(params)
    entry["weight_bytes_per_step"] = weight_bytes_per_step(params)
    log(f"  {kind}: {entry['weight_bytes'] / GB:.2f} GB of weights, {entry['weight_bytes_per_step'] / GB:.2f} GB "
        f"read per decode step")
    prefill = runner.run(f"{kind}: prefill {args.prefill_len} tokens (batch 1)", "prefill",
                         lambda: run_prefill(params, config, args.prefill_len, args.new_tokens, options=args.options))
    if prefill is not None:
        entry["prefill"] = {"tokens": args.prefill_len, "seconds": prefill.seconds,
                            "tokens_per_s": prefill.tokens_per_s, "compile_s": prefill.compile_s,
                            "compiled_memory": prefill.memory}
        log(f"  prefill: {prefill.tokens_per_s:,.0f} tokens/s ({prefill.seconds * 1e3:.1f} ms, "
            f"compile {prefill.compile_s:.1f} s)")
        batch = args.batches[0]
        result = runner.run(f"{kind}: decode batch {batch}", "decode",
                            lambda: run_decode(params, config, prefill.state, batch, args.new_tokens, options=args.options))
        if result is not None:
            record_decode(entry, result, prefill.state, batch, args, summary.get("copy_bandwidth_bytes_per_s"))
        free(prefill.state)
    peak = peak_device_bytes()
    entry["peak_bytes"] = peak
    log(f"  peak device memory so far: {'n/a' if peak is None else f'{peak / GB:.2f} GB'}")
    free(params)
    return None if prefill is None else prefill.rerun


def measure_more_batches(runner: Runner, kind: str, config: BlueLMConfig, prefill: Callable, args,
                         summary: dict) -> None:
    """Decode at the other batch sizes: the kind's weights again, its compiled prefill rerun for the
    prototype state, tiled to each batch."""
    entry = summary["kinds"][kind]
    params = runner.run(f"{kind}: random weights again", "weights",
                        lambda: random_params(config, quantization_of_kind(kind)))
    if params is None:
        return
    prototype = runner.run(f"{kind}: prefill again", "rerun", lambda: jax.block_until_ready(prefill(params)))
    for batch in args.batches[1:] if prototype is not None else ():
        result = runner.run(f"{kind}: decode batch {batch}", "decode",
                            lambda: run_decode(params, config, prototype, batch, args.new_tokens, options=args.options))
        if result is not None:
            record_decode(entry, result, prototype, batch, args, summary.get("copy_bandwidth_bytes_per_s"))
    free(prototype)
    free(params)


def measure_long_prefill(runner: Runner, kind: str, config: BlueLMConfig, args, summary: dict) -> None:
    entry = summary["kinds"].setdefault(kind, {"decode": {}})
    cache_dtype = jnp.int8 if summary["int8_cache"]["available"] else COMPUTE_DTYPE

    def run():
        params = random_params(config, quantization_of_kind(kind))
        try:
            return run_long_prefill(params, config, args.long_prefill_len, cache_dtype, options=args.options)
        finally:
            free(params)

    result = runner.run(f"{kind}: prefill {args.long_prefill_len} tokens, 32K model, "
                        f"{jnp.dtype(cache_dtype).name} cache", "long", run)
    if result is not None:
        entry["long_prefill"] = result
        memory = result["compiled_memory"]
        total = sum(v for k, v in memory.items() if k != "alias" and v is not None)
        log(f"  {result['tokens_per_s']:,.0f} tokens/s ({result['seconds']:.2f} s, compile {result['compile_s']:.1f} s); "
            f"cache {result['cache_bytes'] / GB:.2f} GB; compiled arguments + outputs + temporaries {total / GB:.2f} GB")


def add_ratios(summary: dict) -> None:
    kinds = summary["kinds"]
    base = kinds.get("bf16", {}).get("decode", {}).get("1", {}).get("tokens_per_s")
    for kind in ("int8", "int4"):
        mine = kinds.get(kind, {}).get("decode", {}).get("1", {}).get("tokens_per_s")
        summary["ratios"][f"{kind}/bf16 decode batch 1"] = mine / base if mine and base else None


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / GB:.3g}"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_summary(summary: dict) -> str:
    """The summary as text tables: one row per kind and batch, then the ratios."""
    header = ("kind", "batch", "decode tok/s", "ms/step", "weight GB/step", "KV GB/step", "HBM frac", "HBM frac+KV",
              "prefill tok/s", "long prefill tok/s", "peak GB")
    rows = []
    for kind in summary["args"]["kinds"]:
        entry = summary["kinds"].get(kind, {})
        prefill = entry.get("prefill", {}).get("tokens_per_s")
        long = entry.get("long_prefill", {}).get("tokens_per_s")
        for batch in summary["args"]["batches"]:
            d = entry.get("decode", {}).get(str(batch), {})
            rows.append((kind, str(batch), _num(d.get("tokens_per_s"), ",.1f"),
                         _num(None if "seconds_per_step" not in d else 1e3 * d["seconds_per_step"], ".2f"),
                         _gb(entry.get("weight_bytes_per_step")), _gb(d.get("kv_bytes_per_step")),
                         _num(d.get("hbm_fraction"), ".2f"), _num(d.get("hbm_fraction_with_kv"), ".2f"),
                         _num(prefill, ",.0f"), _num(long, ",.0f"), _gb(entry.get("peak_bytes"))))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)]
    bw = summary.get("copy_bandwidth_bytes_per_s")
    lines.append(f"device: {summary['device']}; copy bandwidth {_num(None if bw is None else bw / GB, ',.0f')} GB/s; "
                 f"int8 cache: {'yes' if summary['int8_cache']['available'] else 'not available'} "
                 f"({summary['int8_cache']['note']})")
    for name, value in summary["ratios"].items():
        lines.append(f"{name}: {_num(value, '.2f')}x")
    if summary.get("memory_table"):
        from bench.quantized_memory import format_rows

        lines.append(format_rows(summary["memory_table"]))
    if summary["skipped"]:
        lines.append(f"skipped (time budget): {'; '.join(summary['skipped'])}")
    if summary["errors"]:
        lines.append(f"errors: {len(summary['errors'])} (listed above and in the JSON)")
    return "\n".join(lines)


def write_json(path: str, summary: dict) -> None:
    """Writes `summary` to `path` through a temporary file renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    args = parse_args(argv)
    runner = Runner(args.budget_s)
    device = jax.devices()[0]
    summary: dict = {"device": f"{device.platform} {getattr(device, 'device_kind', '')}".strip(),
                     "backend": jax.default_backend(), "shape": args.shape,
                     "args": {k: v for k, v in vars(args).items() if k != "options"},
                     "kinds": {}, "ratios": {}, "int8_cache": {"available": False, "note": "not checked"}}
    log(f"bench/accelerator.py on {summary['device']} ({jax.device_count()} device(s), using the first); "
        f"shape {args.shape}; kinds {' '.join(args.kinds)}; batches {' '.join(map(str, args.batches))}")
    bandwidth = runner.run(f"copy bandwidth ({args.copy_mib} MiB)", "bandwidth",
                           lambda: copy_bandwidth(args.copy_mib << 20))
    summary["copy_bandwidth_bytes_per_s"] = bandwidth
    if bandwidth:
        log(f"  {bandwidth / GB:,.1f} GB/s (read + write)")
    support = runner.run("int8 KV cache support", "check", lambda: int8_cache_support(args.options))
    if support is not None:
        summary["int8_cache"] = {"available": support[0], "note": support[1]}
        log(f"  int8 cache {'available' if support[0] else 'not available'}: {support[1]}")

    base, long_config = SHAPES[args.shape]
    ordered = sorted(args.kinds, key=WEIGHT_ORDER.__getitem__)
    log(f"kinds run in increasing weight size ({' '.join(ordered)}): each peak is then the kind's own")
    prefills = {kind: measure_kind(runner, kind, base, args, summary) for kind in ordered}
    add_ratios(summary)
    if len(args.batches) > 1:
        for kind in ordered:
            if prefills[kind] is not None:
                measure_more_batches(runner, kind, base, prefills[kind], args, summary)
    if args.long_prefill_len:
        for kind in ordered:
            measure_long_prefill(runner, kind, long_config, args, summary)
    if not args.no_memory_table:
        from bench.quantized_memory import memory_rows

        summary["memory_table"] = memory_rows(args.shape, args.kinds, runner=runner,
                                              int8_cache=summary["int8_cache"]["available"], options=args.options)
    summary["errors"], summary["skipped"] = runner.errors, runner.skipped
    summary["elapsed_s"] = runner.elapsed()
    log("\n== summary ==")
    log(format_summary(summary))
    if args.out:
        write_json(args.out, summary)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
