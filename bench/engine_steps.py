"""The engine's decode step against `generate`'s batch step, float32 on CPU, side by side.

    python bench/engine_steps.py [--shape medium] [--batch 16] [--syncs 1 4 8] [--new-tokens 65]
                                 [--repeats 3] [--max-len 256]

`generate`: seconds per step of its compiled decode loop alone (bench/decode.py's
`ours_runner`: the whole loop is one device call, no host round trip per step).
engine: `--batch` greedy requests (prompt 16 tokens, `--new-tokens` each, no stop) submitted at
once to an Engine with as many slots; a row's time per step is (finished_at - first_token_at) /
(new tokens - 1), which includes the engine's host loop (one round trip per
`steps_per_sync` steps); the median over rows. All runners are repeated interleaved (every one
sees the same machine load) and the fastest repeat is reported. Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from bench.decode import PROMPT_LEN, SHAPES, _Model, compare, ours_runner  # noqa: E402
from bluelm_jax.engine import Engine, EngineRequest  # noqa: E402


def engine_seconds_per_step(engine: Engine, prompts: list, new_tokens: int) -> float:
    """Median over rows of one run's seconds per decode step (every row runs all its tokens)."""
    handles = [engine.submit(EngineRequest(prompt_ids=tuple(p), max_new_tokens=new_tokens)) for p in prompts]
    per_row = []
    for h in handles:
        assert len(h.result()) == new_tokens and h.finish_reason == "length"
        per_row.append((h.finished_at - h.first_token_at) / (new_tokens - 1))
    return statistics.median(per_row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="medium")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--syncs", nargs="+", type=int, default=[1, 4, 8], help="steps_per_sync values")
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=256, help="the engine's cache slots per row")
    args = parser.parse_args(argv)

    from bench.reference import params_from_hf, random_hf_weights

    config = SHAPES[args.shape]
    model = _Model(config, params_from_hf(config, random_hf_weights(config, seed=0)))
    prompts = np.random.default_rng(0).integers(4, config.vocab_size, (args.batch, PROMPT_LEN)).tolist()
    print(f"{args.shape} ({config.num_parameters() / 1e6:.0f}M parameters), float32, batch {args.batch}, "
          f"prompt {PROMPT_LEN} tokens, {args.new_tokens} new tokens, best of {args.repeats}", flush=True)
    engines = [Engine(model, max_batch=args.batch, max_queue=args.batch, max_len=args.max_len, steps_per_sync=k)
               for k in args.syncs]
    runners = [ours_runner(model, prompts, args.new_tokens)]
    for engine in engines:
        engine_seconds_per_step(engine, prompts, args.new_tokens)  # compiles
        runners.append(lambda engine=engine: engine_seconds_per_step(engine, prompts, args.new_tokens))
    seconds = compare(runners, args.repeats, "min")  # interleaved: every runner sees the same load
    for engine in engines:
        engine.close()
    names = ["generate (decode loop)"] + [f"engine steps_per_sync={k}" for k in args.syncs]
    print(f"{'':<26} {'ms/step':>8} {'tok/s':>8} {'vs generate':>12}")
    for name, s in zip(names, seconds):
        print(f"{name:<26} {s * 1e3:>8.1f} {args.batch / s:>8.1f} {s / seconds[0]:>11.2f}x")


if __name__ == "__main__":
    main()
