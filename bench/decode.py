"""Decode throughput, side by side: bluelm-jax vs the transformers reference, float32 on CPU.

    python bench/decode.py [--shapes small medium] [--batches 1 8] [--new-tokens 64] [--repeats 3]

Both run the same random-weight BlueLM checkpoint (the transformers model is LLaMA plus
BlueLM's embedding LayerNorm, see tests/hf_reference.py), greedy, from the same prompt.
Decode tokens per second exclude the prefill:
  * bluelm-jax: the time of the compiled decode loop alone (after prefill, compiled beforehand);
  * transformers: generate(N + 1 new tokens) minus generate(1 new token), both with
    min_new_tokens so that no row stops early.
Roofline: a decode step must read every parameter except the embedding table once
(bytes per step = that many parameters x 4). Two bandwidths bound it, both measured here:
  * copy: a large numpy copy, STREAM convention (the read and the write both counted), the
    measure the issue's targets are stated in;
  * read: a large XLA reduction, the fastest streaming read this machine showed (stricter).
The fraction is measured steps per second / (bandwidth / bytes per step).
`--layout` picks bluelm-jax's parameter layout: `per-layer` (what `generate` on one device
uses: `load(..., per_layer=True)`) or `stacked` (the scanned layout of training and sharding).
Timings are never asserted in tests.
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

from bluelm_jax import decode  # noqa: E402
from bluelm_jax import generate as G  # noqa: E402
from bluelm_jax.config import BlueLMConfig  # noqa: E402
from bluelm_jax.params import unstack_layers  # noqa: E402
from bluelm_jax.planning import GenerationSettings, make_plan  # noqa: E402

SHAPES = {
    # ~58M parameters
    "small": BlueLMConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=4, num_key_value_heads=4),
    # ~410M parameters, BlueLM's vocabulary
    "medium": BlueLMConfig(vocab_size=100096, hidden_size=1024, intermediate_size=2752, num_hidden_layers=16,
                           num_attention_heads=8, num_key_value_heads=8),
}
PROMPT_LEN = 16


class _Model:
    def __init__(self, config, params):
        self.config, self.params, self.tokenizer, self.compute_dtype = config, params, None, jnp.float32


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes moved per second by a large numpy copy, counting the read and the write (STREAM)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes read per second by a compiled XLA sum over a large array (all threads)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best




def bytes_per_step(config: BlueLMConfig) -> int:
    return 4 * (config.num_parameters() - config.vocab_size * config.hidden_size)


def ours_runner(model, prompts, new_tokens: int):
    """A function timing one decode loop of bluelm-jax: seconds per step (compiled on creation)."""
    plan = make_plan(model, prompts, GenerationSettings(max_new_tokens=new_tokens, add_bos=False))
    until = jnp.int32(plan.width)

    def run() -> float:
        state = G.prefill(model, plan)
        jax.block_until_ready(state)
        t = time.perf_counter()
        state = decode.decode_loop(model.params, state, plan.request, until, static=plan.static)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - t
        steps = int(state.step) - 1  # the prefill produced the first token
        assert steps == new_tokens - 1, (steps, new_tokens)  # no row stopped early
        return elapsed / steps

    run()  # compiles
    return run


def reference_runner(ref, prompts, new_tokens: int):
    """A function timing transformers' generate: seconds per decode step."""
    import torch

    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=3)

    def generate(n) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    def run() -> float:
        return (generate(new_tokens) - generate(1)) / (new_tokens - 1)

    generate(2)  # warm-up
    return run


def compare(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds per step of each, the runs interleaved so both see the same machine load."""
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(theirs())
    return statistics.median(a), statistics.median(b)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", choices=("per-layer", "stacked"), default="per-layer",
                        help="bluelm-jax parameter layout (default per-layer, as generate uses on one device)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args(argv)

    import torch

    from tests.hf_reference import params_from_hf, random_hf_weights, reference_model

    torch.set_num_threads(args.threads)
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}")
    print(f"bluelm-jax layout {args.layout}; copy bandwidth {bw / 1e9:.1f} GB/s, read bandwidth "
          f"{read_bw / 1e9:.1f} GB/s; prompt {PROMPT_LEN} tokens; {args.new_tokens} new tokens; "
          f"median of {args.repeats}")
    header = (f"{'shape':<7} {'params':>7} {'batch':>5} | {'jax tok/s':>9} {'hf tok/s':>9} {'ratio':>6} | "
              f"{'copy-roof tok/s':>15} {'jax %':>6} {'hf %':>6} | {'read-roof tok/s':>15} {'jax %':>6} {'hf %':>6}")
    rows = []
    for name in args.shapes:
        config = SHAPES[name]
        weights = random_hf_weights(config, seed=0)
        params = params_from_hf(config, weights)
        model = _Model(config, unstack_layers(params) if args.layout == "per-layer" else params)
        del params
        ref = reference_model(config, weights)
        del weights
        step_bytes = bytes_per_step(config)
        roof_steps = bw / step_bytes  # steps per second at the copy-bandwidth bound
        read_roof_steps = read_bw / step_bytes
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(4, config.vocab_size, (batch, PROMPT_LEN)).tolist()
            ours, theirs = compare(ours_runner(model, prompts, args.new_tokens),
                                   reference_runner(ref, prompts, args.new_tokens), args.repeats)
            rows.append(f"{name:<7} {config.num_parameters() / 1e6:>6.0f}M {batch:>5} | "
                        f"{batch / ours:>9.1f} {batch / theirs:>9.1f} {theirs / ours:>5.2f}x | "
                        f"{batch * roof_steps:>15.1f} {100 / ours / roof_steps:>5.0f}% {100 / theirs / roof_steps:>5.0f}% | "
                        f"{batch * read_roof_steps:>15.1f} {100 / ours / read_roof_steps:>5.0f}% "
                        f"{100 / theirs / read_roof_steps:>5.0f}%")
            print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
        del model, ref


if __name__ == "__main__":
    main()
