"""One projection's product on CPU, formulation by formulation, against PyTorch's, side by side.

    python -m bench.cpu_products [--shape 4096 11008] [--rows 1 4 8 32] [--repeats 20]

For one bfloat16 weight of BlueLM-7B's MLP shape (in 4096, out 11008) and float32
activations of a few rows (decode's batch), it times each way of computing x @ W that XLA
offers here, and transformers' own (torch.nn.functional.linear in bfloat16, [out, in]):

  float32 [in,out]          the weight upcast once, beforehand (twice the memory: not an option at 7B)
  bf16 dot [in,out]         one bfloat16 dot, float32 result, rows as they are
  bf16 pad8 [in,out]        the KERNEL layout's product (model._bf16_weight_matmul, rows padded to 8)
  bf16 pad8 [out,in]        the WEIGHT layout's product (the same, contracting the weight's dim 1)
  convert+f32 [in,out]      the weight converted to float32 inside the program, then a float32 dot
  multiply-reduce [out,in]  x * W summed over `in`, the convert fused into the reduction
  int8 product [out,in]     quantize.int8_product: int8 per output channel, scaled after its dots
                            (the formulation it picks for the row count: x's int8 digits in an
                            integer dot up to 8 rows, float32 blocks of 64 channels beyond)
  int8 digits               its integer-dot formulation at every row count
  int8 f32 blocks           its float32-block formulation at every row count
  int4 blocked [out,in]     quantize.int4_product: packed int4, groups of 128, dequantized 64 channels at a time
  int8 multiply-reduce      the int8 weight's convert fused into a multiply-reduce over [out, in]
  int8 multiply-reduce pad8 the same on rows padded to 8
  torch bf16 [out,in]       what transformers runs (oneDNN; AMX where the processor has it)

Medians of --repeats calls, each compiled beforehand, the formulations taking turns. For
each: ms, the bytes of the weight as that product stores it (bfloat16, float32, int8 or
packed int4, with scales) per second, that as a fraction of the machine's bandwidth measured
in the same run (a large numpy copy, read and write counted: see bench/decode.py), and the
time over float32's and over torch's.
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

from bench.decode import copy_bandwidth  # noqa: E402
from bluelm_jax import quantize as Q  # noqa: E402
from bluelm_jax.model import _bf16_weight_matmul  # noqa: E402


def interleaved_medians_ms(calls: dict, repeats: int) -> dict:
    """name -> the median ms of `repeats` calls of calls[name](), each called once beforehand.
    The calls take turns (one of each per round), so load from other work on this shared
    machine falls on all of them alike."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(seconds) for name, seconds in times.items()}


def jax_formulations(w_in_out: jax.Array, w_out_in: jax.Array) -> dict:
    """name -> (jitted f(x, w), its weight (an array or a tuple of arrays, passed as f(x, *w)))."""
    f32 = jnp.float32
    dims = lambda w_in_axis: (((1,), (w_in_axis,)), ((), ()))  # noqa: E731
    return {
        "float32 [in,out]": (jax.jit(lambda x, w: x @ w), w_in_out.astype(f32)),
        "bf16 dot [in,out]": (jax.jit(lambda x, w: jax.lax.dot_general(
            x.astype(jnp.bfloat16), w, dims(0), preferred_element_type=f32)), w_in_out),
        "bf16 pad8 [in,out]": (jax.jit(lambda x, w: _bf16_weight_matmul(x, w, 0)), w_in_out),
        "bf16 pad8 [out,in]": (jax.jit(lambda x, w: _bf16_weight_matmul(x, w, 1)), w_out_in),
        "convert+f32 [in,out]": (jax.jit(lambda x, w: x @ w.astype(f32)), w_in_out),
        "multiply-reduce [out,in]": (jax.jit(lambda x, w: jnp.sum(x[:, None, :] * w.astype(f32), axis=-1)), w_out_in),
        **quantized_formulations(w_out_in),
    }


def quantized_formulations(w_out_in: jax.Array) -> dict:
    """The int8 and int4 products of bluelm_jax.quantize on the weight quantized [out, in], and the
    int8 product's formulations forced at every row count."""
    int8 = Q.quantize_int8(w_out_in, 1)  # (q [out, in] int8, scale [out])
    int4 = Q.quantize_int4(w_out_in, 1)  # (packed [out, in/2] int8, scale [in/128, out])
    multiply_reduce = lambda x, q, s: jnp.sum(x[:, None, :] * q.astype(jnp.float32), axis=-1) * s  # noqa: E731

    def f32_blocks(x, q, s):
        block = Q._block_size(q.shape[0], Q.OUT_BLOCK)
        return Q._blocked_product(x, q, 1, lambda q_block: q_block.astype(jnp.float32), block) * s

    def padded_multiply_reduce(x, q, s):
        padding = -x.shape[0] % 8
        return multiply_reduce(jnp.pad(x, ((0, padding), (0, 0))), q, s)[: x.shape[0]]

    return {
        "int8 product [out,in]": (jax.jit(lambda x, q, s: Q.int8_product(x, q, s, 1)), int8),
        "int8 digits [out,in]": (jax.jit(lambda x, q, s: Q._int8_digit_product(x, q, 1) * s), int8),
        "int8 f32 blocks [out,in]": (jax.jit(f32_blocks), int8),
        "int4 blocked [out,in]": (jax.jit(lambda x, q, s: Q.int4_product(x, q, s, 1)), int4),
        "int8 multiply-reduce [out,in]": (jax.jit(multiply_reduce), int8),
        "int8 multiply-reduce pad8 [out,in]": (jax.jit(padded_multiply_reduce), int8),
    }


def stored_bytes(weight) -> int:
    """Bytes of a weight as a product reads it: one array or a tuple (quantized values, scales)."""
    return sum(a.nbytes for a in (weight if isinstance(weight, tuple) else (weight,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 11008), metavar=("IN", "OUT"))
    parser.add_argument("--rows", type=int, nargs="+", default=(1, 4, 8, 32))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import torch

    n_in, n_out = args.shape
    rng = np.random.default_rng(0)
    w_torch = torch.from_numpy(rng.standard_normal((n_out, n_in), np.float32)).to(torch.bfloat16)  # [out, in]
    w_out_in = jnp.asarray(w_torch.float().numpy()).astype(jnp.bfloat16)
    w_in_out = jnp.asarray(w_out_in.T)  # a contiguous [in, out] copy
    weight_bytes = n_in * n_out * 2
    bandwidth = copy_bandwidth()
    print(f"weight [{n_in}, {n_out}] bfloat16 ({weight_bytes / 1e6:.0f} MB); copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}, "
          f"{os.cpu_count()} cores")
    print("| rows | product | ms | GB/s of stored weight | of bandwidth | / float32 | / torch |\n"
          "|---|---|---|---|---|---|---|")
    formulations = jax_formulations(w_in_out, w_out_in)
    for rows in args.rows:
        x = rng.standard_normal((rows, n_in), np.float32)
        x_torch = torch.from_numpy(x).to(torch.bfloat16)
        x_jax = jnp.asarray(x)
        calls = {name: (lambda f=f, w=w: f(x_jax, *(w if isinstance(w, tuple) else (w,))).block_until_ready())
                 for name, (f, w) in formulations.items()}
        calls["torch bf16 [out,in]"] = lambda: torch.nn.functional.linear(x_torch, w_torch)
        with torch.no_grad():
            times = interleaved_medians_ms(calls, args.repeats)
        torch_ms = times["torch bf16 [out,in]"]
        sizes = {name: stored_bytes(w) for name, (_, w) in formulations.items()}
        for name, ms in times.items():
            rate = sizes.get(name, weight_bytes) / (ms / 1e3)
            print(f"| {rows} | {name} | {ms:.1f} | {rate / 1e9:.1f} | {rate / bandwidth:.2f} "
                  f"| {ms / times['float32 [in,out]']:.2f} | {ms / torch_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
