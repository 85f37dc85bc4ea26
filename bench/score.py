"""Scoring throughput, side by side: bluelm-jax's loglikelihood vs the transformers reference.

    python bench/score.py [--shape medium] [--pairs 64] [--batch-size 8] [--repeats 3]

Both score the same (context, continuation) pairs of random token ids (contexts of 20 to 200
tokens, continuations of 1 to 20, like multiple-choice and short-answer tasks) under the same
random-weight checkpoint, float32 on CPU. bluelm-jax: scoring.loglikelihood (inputs packed into
rows of one width, the head only at the continuation's positions, batches of --batch-size
packed rows, every program compiled before timing). transformers: the same pairs sorted by
length in batches of --batch-size rows right-padded to the batch's longest, one forward each,
float32 log-softmax and a gather, as lm-evaluation-harness's HF model does.

Tokens per second count every token of every pair (context and continuation); the median of
--repeats runs, and their ratio. Scoring is compute-bound (hundreds of tokens a forward pass), so
the roofline is the machine's float32 matmul rate, measured here with one large jnp.dot: the
fraction printed for each side is the work scoring needs (the layers at every input token, the
head at each continuation token) per second over that rate. The sums of the two sides are compared too.
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

import numpy as np  # noqa: E402

from bench.decode import SHAPES  # noqa: E402
from bluelm_jax import scoring  # noqa: E402
from bluelm_jax.loading import BlueLM  # noqa: E402


def random_pairs(vocab: int, count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [([1] + rng.integers(4, vocab, rng.integers(19, 200)).tolist(),
             rng.integers(4, vocab, rng.integers(1, 21)).tolist()) for _ in range(count)]


def reference_loglikelihood(reference, pairs, batch_size: int) -> list[float]:
    """transformers: the summed continuation log-probability of each pair, batched as described."""
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    found = [0.0] * len(pairs)
    with torch.no_grad():
        for at in range(0, len(order), batch_size):
            batch = order[at:at + batch_size]
            rows = [pairs[i][0] + pairs[i][1] for i in batch]
            width = max(map(len, rows))
            tokens = torch.full((len(rows), width), 3, dtype=torch.long)
            for r, row in enumerate(rows):
                tokens[r, :len(row)] = torch.tensor(row)
            logprobs = torch.log_softmax(reference(tokens).logits.float(), -1)  # [batch, width, vocab]
            for r, i in enumerate(batch):
                n, total = len(pairs[i][1]), len(rows[r])
                targets = tokens[r, total - n:total]
                found[i] = float(logprobs[r, total - n - 1:total - 1].gather(-1, targets[:, None]).sum())
    return found


def matmul_rate(repeats: int = 5) -> float:
    """FLOP/s of a float32 [2048, 1024] x [1024, 2752] jnp.dot (an MLP product of the medium shape), best of repeats."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((2048, 1024), jnp.float32), jnp.ones((1024, 2752), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(x, w).block_until_ready()
    best = min(timed(lambda: dot(x, w).block_until_ready(), 1) for _ in range(repeats))
    return 2 * 2048 * 1024 * 2752 / best


def needed_flops(config, pairs) -> float:
    """The multiply-adds x 2 that scoring the pairs needs: every projection at each input token
    (attention scores excluded), the head at each continuation token."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    per_token = 2 * config.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size)
    inputs = sum(len(c) + len(x) - 1 for c, x in pairs)
    return per_token * inputs + 2 * h * config.vocab_size * sum(len(x) for _, x in pairs)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="medium")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args(argv)
    import jax.numpy as jnp
    import torch

    from bench.reference import params_from_hf, random_hf_weights, reference_model

    torch.set_num_threads(args.threads)
    config = SHAPES[args.shape]
    weights = random_hf_weights(config, seed=0)
    model = BlueLM(config, None, params_from_hf(config, weights), jnp.float32)
    reference = reference_model(config, weights)
    del weights
    pairs = random_pairs(config.vocab_size, args.pairs)
    tokens = sum(len(c) + len(x) for c, x in pairs)
    ours = scoring.loglikelihood(model, pairs, args.batch_size)  # compiles every bucket
    theirs = reference_loglikelihood(reference, pairs, args.batch_size)
    ours_s = timed(lambda: scoring.loglikelihood(model, pairs, args.batch_size), args.repeats)
    theirs_s = timed(lambda: reference_loglikelihood(reference, pairs, args.batch_size), args.repeats)
    worst = max(abs(a.logprob - b) for a, b in zip(ours, theirs))
    peak, work = matmul_rate(), needed_flops(config, pairs)
    print(f"{args.shape} ({config.num_parameters() / 1e6:.0f}M parameters), {args.pairs} pairs, {tokens} tokens, "
          f"batch {args.batch_size}, float32, median of {args.repeats}")
    print(f"float32 matmul roofline {peak / 1e9:.0f} GFLOP/s; scoring needs {work / 1e9:.0f} GFLOP")
    print(f"bluelm-jax:   {tokens / ours_s:8.1f} tokens/s ({ours_s:.2f} s), {work / ours_s / peak:.0%} of the roofline")
    print(f"transformers: {tokens / theirs_s:8.1f} tokens/s ({theirs_s:.2f} s), {work / theirs_s / peak:.0%} of the roofline")
    print(f"ratio: {theirs_s / ours_s:.2f}x; largest difference of a pair's log-likelihood {worst:.2e}")


if __name__ == "__main__":
    main()
