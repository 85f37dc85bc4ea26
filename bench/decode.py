"""Decode throughput, side by side: bluelm-jax vs the transformers reference, float32 on CPU.

    python bench/decode.py [--shapes small medium] [--batches 1 8] [--new-tokens 64] [--repeats 3]
                           [--baseline DIR] [--skip-reference] [--statistic median|min]
    python bench/decode.py --quantize float32 bf16 int8 int4 [--shapes medium] [--batches 1 8]

Both run the same random-weight BlueLM checkpoint (the transformers model is LLaMA plus
BlueLM's embedding LayerNorm, see bench/reference.py), greedy, from the same prompt.
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
`--baseline DIR` also times another revision of bluelm-jax in the same run, on the same
weights and prompts, interleaved with this one: DIR is a checkout of it, e.g.
`git worktree add /tmp/bluelm-before c7c190d` (the last revision before the NNX module
tree, whose per-layer layout is a list of dicts {q_proj: [in, out], ...}: `baseline_runner`
speaks that revision's API). `--skip-reference` leaves transformers out. `--statistic min`
reports the fastest of the repeats instead of the median (steadier on a shared machine,
where other load only ever slows a run down).
`--quantize FORM...` times weight forms of bluelm-jax against each other instead (float32;
bf16 storage in the [out, in] layout load() picks on CPU; int8 and int4 projections,
quantize.py), interleaved in one run, each against the roofline of its own bytes per step.
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

from bench import accelerator  # noqa: E402
from bluelm_jax import decode  # noqa: E402
from bluelm_jax import generate as G  # noqa: E402
from bluelm_jax.config import BlueLMConfig  # noqa: E402
from bluelm_jax.params import flatten  # noqa: E402
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


def decode_runner(prefill, decode_loop, new_tokens: int):
    """A function timing one decode loop: seconds per step (compiled on creation).

    prefill() -> the state after the prompt; decode_loop(state) -> the state after the loop."""

    def run() -> float:
        state = prefill()
        jax.block_until_ready(state)
        t = time.perf_counter()
        state = decode_loop(state)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - t
        steps = int(state.step) - 1  # the prefill produced the first token
        assert steps == new_tokens - 1, (steps, new_tokens)  # no row stopped early
        return elapsed / steps

    run()  # compiles
    return run


def ours_runner(model, prompts, new_tokens: int):
    """`decode_runner` of bluelm-jax's generation."""
    plan = make_plan(model, prompts, GenerationSettings(max_new_tokens=new_tokens, add_bos=False))
    until = jnp.int32(plan.width)
    return decode_runner(lambda: G.prefill(model, plan),
                         lambda state: decode.decode_loop(model.params, state, plan.request, until, static=plan.static),
                         new_tokens)


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


def import_baseline(root: str) -> dict:
    """The generate module of the bluelm-jax checkout at `root`, imported beside this one.

    Its modules are imported under their own names with `root` first on the path, then moved
    out of sys.modules (they keep their references to each other), and this checkout's put back."""
    import importlib

    def is_ours(name: str) -> bool:
        return name == "bluelm_jax" or name.startswith("bluelm_jax.")

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if is_ours(k)}
    sys.path.insert(0, os.path.abspath(root))
    try:
        generate = importlib.import_module("bluelm_jax.generate")
        assert os.path.abspath(generate.__file__).startswith(os.path.abspath(root)), generate.__file__
    finally:
        sys.path.remove(os.path.abspath(root))
        for k in [k for k in sys.modules if is_ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return {"generate": generate}


def baseline_params(params: dict) -> dict:
    """This checkout's parameters in the baseline's per-layer layout (the same arrays)."""
    m = params["model"]
    layers = [{path[-2]: leaf for path, leaf in flatten(layer)} for _, layer in sorted(m["layers"].items())]
    return {"embed_tokens": m["embed_tokens"]["embedding"], "embed_layer_norm": dict(m["embed_layer_norm"]),
            "layers": layers, "norm": m["norm"]["weight"], "lm_head": params["lm_head"]["kernel"]}


def baseline_runner(baseline: dict, model, prompts, new_tokens: int):
    """Like `ours_runner`, through the baseline's generate module (its private API of c7c190d)."""
    BG = baseline["generate"]
    old = _Model(model.config, baseline_params(model.params))
    plan = BG._plan(old, prompts, max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                    repetition_penalty=1.0, seed=0, stop=None, chat=False, add_bos=False)
    until = jnp.int32(plan.width)
    return decode_runner(lambda: BG._prefill_plan(old, plan),
                         lambda state: BG._decode_loop_jit(old.params, state, plan.request, until, static=plan.static),
                         new_tokens)


WEIGHT_FORMS = ("float32", "bf16", "int8", "int4")


def weight_form(params: dict, config: BlueLMConfig, form: str) -> dict:
    """The float32 `params` stored as `form`: float32 as they are; bf16 cast to bfloat16 in the
    weight layout, as load() keeps bfloat16 weights for float32 compute on CPU; int8 or int4
    quantized projections (quantize.quantize_params)."""
    from bluelm_jax import layout as L
    from bluelm_jax import params as P
    from bluelm_jax import quantize as Q

    copy = jax.tree.map(lambda x: x, params)
    if form == "float32":
        return copy
    if form == "bf16":
        return L.to_layout(jax.tree.map(lambda x: x.astype(jnp.bfloat16), copy), P.WEIGHT)
    return Q.quantize_params(copy, P.as_quantization(form, config))


def compare_weight_forms(config: BlueLMConfig, params: dict, forms: list[str], batches: list[int], args,
                         bandwidth: float) -> None:
    """Decode tok/s of each weight form side by side, interleaved, with its ratio to the first
    form and its fraction of the copy-bandwidth roofline of its own bytes per step."""
    models = {form: _Model(config, weight_form(params, config, form)) for form in forms}
    print(f"{'batch':>5} | " + " | ".join(f"{form + ' tok/s':>13} {'x ' + forms[0]:>9} {'roof':>5}"
                                          for form in forms), flush=True)
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(4, config.vocab_size, (batch, PROMPT_LEN)).tolist()
        seconds = compare([ours_runner(models[form], prompts, args.new_tokens) for form in forms], args.repeats,
                          args.statistic)
        cells = []
        for form, step in zip(forms, seconds):
            roof = bandwidth / accelerator.weight_bytes_per_step(models[form].params)  # steps per second
            cells.append(f"{batch / step:>13.1f} {seconds[0] / step:>8.2f}x {100 / step / roof:>4.0f}%")
        print(f"{batch:>5} | " + " | ".join(cells), flush=True)


def compare(runners: list, repeats: int, statistic: str = "median") -> list[float]:
    """Seconds per step of each runner (median or min of the repeats), the runs interleaved so
    all see the same machine load."""
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for run, out in zip(runners, times):
            out.append(run())
    return [statistics.median(t) if statistic == "median" else min(t) for t in times]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", metavar="DIR", help="a checkout of another bluelm-jax revision to time too")
    parser.add_argument("--skip-reference", action="store_true", help="do not time transformers")
    parser.add_argument("--statistic", choices=("median", "min"), default="median", help="of the repeats")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--quantize", nargs="+", choices=WEIGHT_FORMS, metavar="FORM",
                        help="instead of the table against transformers, time these weight forms of bluelm-jax "
                             "side by side (float32, bf16, int8, int4; ratios to the first)")
    args = parser.parse_args(argv)
    if args.quantize:
        from bench.reference import params_from_hf, random_hf_weights

        bandwidth = copy_bandwidth()
        print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, copy bandwidth {bandwidth / 1e9:.1f} GB/s; prompt "
              f"{PROMPT_LEN} tokens; {args.new_tokens} new tokens; {args.statistic} of {args.repeats}; float32 "
              f"compute; roof: tok/s against the copy-bandwidth roofline of each form's bytes per step")
        for name in args.shapes:
            config = SHAPES[name]
            print(f"{name} ({config.num_parameters() / 1e6:.0f}M parameters)", flush=True)
            compare_weight_forms(config, params_from_hf(config, random_hf_weights(config, seed=0)), args.quantize,
                                 args.batches, args, bandwidth)
        return

    import torch

    from bench.reference import params_from_hf, random_hf_weights, reference_model

    torch.set_num_threads(args.threads)
    baseline = import_baseline(args.baseline) if args.baseline else None
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s, read bandwidth {read_bw / 1e9:.1f} GB/s; prompt {PROMPT_LEN} "
          f"tokens; {args.new_tokens} new tokens; {args.statistic} of {args.repeats}"
          + (f"; baseline {args.baseline}" if baseline else ""))
    columns = ["jax tok/s"] + (["base tok/s", "new/base"] if baseline else []) + \
              ([] if args.skip_reference else ["hf tok/s", "jax/hf"])
    header = (f"{'shape':<7} {'params':>7} {'batch':>5} | " + " ".join(f"{c:>10}" for c in columns) +
              f" | {'copy-roof tok/s':>15} {'jax %':>6} | {'read-roof tok/s':>15} {'jax %':>6}")
    print(header, flush=True)
    for name in args.shapes:
        config = SHAPES[name]
        weights = random_hf_weights(config, seed=0)
        model = _Model(config, params_from_hf(config, weights))
        ref = None if args.skip_reference else reference_model(config, weights)
        del weights
        step_bytes = bytes_per_step(config)
        roof_steps = bw / step_bytes  # steps per second at the copy-bandwidth bound
        read_roof_steps = read_bw / step_bytes
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(4, config.vocab_size, (batch, PROMPT_LEN)).tolist()
            runners = [ours_runner(model, prompts, args.new_tokens)]
            if baseline:
                runners.append(baseline_runner(baseline, model, prompts, args.new_tokens))
            if ref is not None:
                runners.append(reference_runner(ref, prompts, args.new_tokens))
            seconds = compare(runners, args.repeats, args.statistic)
            ours = seconds[0]
            values = [f"{batch / ours:>10.1f}"]
            if baseline:
                values += [f"{batch / seconds[1]:>10.1f}", f"{seconds[1] / ours:>9.3f}x"]
            if ref is not None:
                values += [f"{batch / seconds[-1]:>10.1f}", f"{seconds[-1] / ours:>9.2f}x"]
            print(f"{name:<7} {config.num_parameters() / 1e6:>6.0f}M {batch:>5} | " + " ".join(values) +
                  f" | {batch * roof_steps:>15.1f} {100 / ours / roof_steps:>5.0f}% | "
                  f"{batch * read_roof_steps:>15.1f} {100 / ours / read_roof_steps:>5.0f}%", flush=True)
        del model, ref


if __name__ == "__main__":
    main()
