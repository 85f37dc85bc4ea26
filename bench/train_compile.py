"""Compile time and compiled memory of a 7B-shaped full fine-tuning step: unrolled vs scanned layers.

    python bench/train_compile.py [--seq 256] [--batch 1] [--remat both|on|off] [--layouts unrolled scanned]
                                  [--max-grad-norm 1.0]

The step is lowered from abstract shapes (jax.ShapeDtypeStruct: no weight is ever
allocated) and compiled for the local backend: the loss (train.masked_cross_entropy), its
gradient, and the project's optimizer (train.make_optimizer: clipping by the global
gradient norm unless --max-grad-norm 0, AdamW), the
parameters and the optimizer state donated, float32 master weights and products.

    unrolled   the module tree as it is: one buffer per layer and weight (model.forward)
    scanned    the same DecoderLayer run by lax.scan over its state stacked on a leading
               layer axis (the layout bluelm-jax used before the module tree)

Reported: lowering and compile seconds, and XLA's memory analysis: arguments (parameters,
optimizer state, batch), temporaries (activations, gradients, everything else the step
allocates) and the peak estimate arguments + temporaries + outputs - aliased (donated)
bytes. Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bluelm_jax import train as T  # noqa: E402
from bluelm_jax.checkpoint import abstract_params  # noqa: E402
from bluelm_jax.config import BlueLMConfig, preset  # noqa: E402
from bluelm_jax.model import Context, DecoderLayer, build, forward  # noqa: E402
from bluelm_jax.rope import sin_cos  # noqa: E402

GiB = 1 << 30


def unrolled_logits(params: dict, tokens: jax.Array, config: BlueLMConfig, remat: bool) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return forward(params, tokens, positions, config, remat=remat)[0]


def scanned_logits(params: dict, tokens: jax.Array, config: BlueLMConfig, remat: bool) -> jax.Array:
    """The model's own modules, with the layers' state stacked and scanned (params["model"]["layers"]:
    one tree of [layers, ...] leaves)."""
    top = build(config.replace(num_hidden_layers=0), {**params, "model": {k: v for k, v in params["model"].items()
                                                                       if k != "layers"}})
    layer_graph = nnx.split(nnx.eval_shape(lambda: DecoderLayer(config, jnp.float32, jnp.float32, nnx.Rngs(0))))[0]
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    x = top.model.embed_layer_norm(top.model.embed_tokens(tokens))
    sin, cos = sin_cos(positions, config)
    ctx = Context(sin, cos, jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), 0, "auto", None)

    def body(x, layer_state):
        return nnx.merge(layer_graph, layer_state)(x, ctx, None, 0)[0], None

    x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, params["model"]["layers"])
    return top.lm_head(top.model.norm(x))


def abstract_tree(config: BlueLMConfig, layout: str) -> dict:
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params(config, "float32"))
    if layout == "scanned":
        layers = params["model"].pop("layers")
        params["model"]["layers"] = jax.tree.map(
            lambda *xs: jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype), *layers.values())
    return params


def measure(config: BlueLMConfig, layout: str, remat: bool, batch: int, seq: int, max_grad_norm: float) -> dict:
    logits_fn = unrolled_logits if layout == "unrolled" else scanned_logits
    tx = T.make_optimizer(T.TrainConfig(max_steps=10, weight_decay=0.01, max_grad_norm=max_grad_norm))

    def step(params, opt_state, tokens, targets):
        def loss(p):
            return T.masked_cross_entropy(logits_fn(p, tokens, config, remat), targets, jnp.ones(targets.shape))[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, value

    params = abstract_tree(config, layout)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, tokens)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "arguments": m.argument_size_in_bytes / GiB,
            "temporaries": m.temp_size_in_bytes / GiB, "peak": peak / GiB}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bluelm-7b-base", help="a preset of config.py")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--remat", choices=("both", "on", "off"), default="both")
    parser.add_argument("--layouts", nargs="+", choices=("unrolled", "scanned"), default=["unrolled", "scanned"])
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    args = parser.parse_args(argv)
    config = preset(args.config)
    remats = {"both": (True, False), "on": (True,), "off": (False,)}[args.remat]
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs; {args.config}: "
          f"{config.num_parameters() / 1e9:.2f}B parameters, {config.num_hidden_layers} layers; "
          f"batch {args.batch} x {args.seq} tokens; float32; max_grad_norm {args.max_grad_norm}")
    print(f"{'layout':<9} {'remat':<5} | {'lower s':>7} {'compile s':>9} | {'args GiB':>8} {'temp GiB':>8} "
          f"{'peak GiB':>8}", flush=True)
    for remat in remats:
        for layout in args.layouts:
            r = measure(config, layout, remat, args.batch, args.seq, args.max_grad_norm)
            print(f"{layout:<9} {'on' if remat else 'off':<5} | {r['lower_s']:>7.1f} {r['compile_s']:>9.1f} | "
                  f"{r['arguments']:>8.2f} {r['temporaries']:>8.2f} {r['peak']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
