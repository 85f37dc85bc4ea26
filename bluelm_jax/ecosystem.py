"""The module tree in the Flax ecosystem: qwix's LoRA and weight-only quantization.

qwix (the `quant` extra) rewrites a model by intercepting `jax.lax.dot_general` while the
model's `__call__` runs, and picks what to do from the path of the calling module
(`model/layers/3/self_attn/q_proj`) matched against a regex. Every projection of the tree is
an `nnx.Linear` whose product (`model.projection_product`) calls `jax.lax.dot_general`, so
qwix sees each one under its PyTorch-like path and nothing in model.py needs to know:

- `qwix_lora`: beside each target kernel, `kernel_lora_a` [in, rank] and `kernel_lora_b`
  [rank, out] (`nnx.LoRAParam`, carrying the kernel's logical axes); the projection becomes
  x W + (alpha / rank) * x A B, as with lora.py's adapters. A starts as lora.init's
  (uniform in +-1/sqrt(in)), B at zero. Train them with
  `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`, as Tunix's PeftTrainer does;
  `adapter_tree` gathers them into lora.py's layer-stacked tree, for `lora.merge`,
  `lora.save` and the model's `Adapters`.
- `quantize_weights`: target kernels become qwix arrays, int8 or int4 values
  [in, out] and float32 scales [in / tile_size or 1, out] (per output channel, or per
  group of `tile_size` input rows). With float activations qwix multiplies the dequantized
  weight (values times scales, computed inside the compiled function) in floating point.
  `quantized_state` does the same from float parameters without building the float model.

Both return a module of a class qwix derived from BlueLMForCausalLM. Compile it as the rest
of the project does: `graph, state = nnx.split(model)` outside, `nnx.merge(graph, state)`
inside the jitted function. `model.forward` and the library's generation and training
rebuild the plain tree from `model.graphdef(config)` and do not see these changes.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from bluelm_jax import lora as L
from bluelm_jax import params as P
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.model import BlueLMForCausalLM

# lora.init's A: uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform), instead of qwix's he_uniform.
LORA_A_INIT = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
QUANT_TYPES = ("int8", "int4")


def module_path_pattern(targets: str | tuple | list, lm_head: bool = False) -> str:
    """The regex of qwix's `module_path` that matches the target projections of every layer
    (names as lora.parse_targets reads them), and `lm_head` with `lm_head`."""
    modules = "|".join(re.escape("/".join(P.LAYER_PROJECTIONS[name].path[:-1]))
                       for name in L.parse_targets(targets))
    pattern = "/".join(P.LAYERS) + rf"/\d+/({modules})"
    return f"({pattern}|lm_head)" if lm_head else pattern


def example_inputs(batch: int = 1, seq: int = 2) -> tuple[jax.Array, jax.Array]:
    """(tokens, positions) [batch, seq] int32: the call qwix traces the model with once."""
    tokens = jnp.zeros((batch, seq), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def qwix_lora(model: BlueLMForCausalLM, rank: int = 8, alpha: float = 16.0,
              targets: str | tuple | list = ("q_proj", "k_proj", "v_proj", "o_proj"),
              seed: int = 0) -> BlueLMForCausalLM:
    """A copy of `model` with qwix LoRA adapters (fresh: B = 0, so the logits are unchanged)
    on the target projections; rank, alpha and targets are checked as lora.LoraConfig does.

    No dropout: qwix's LoRA dropout runs on every call (it has no inference switch) and
    needs an `nnx.Rngs` set on the model; lora.py's adapters have it for training only."""
    P.require_kernel_layout(nnx.state(model, nnx.Param).to_pure_dict(), "qwix")
    settings = L.LoraConfig(rank, alpha, 0.0, targets)
    provider = qwix.LoraProvider(module_path=module_path_pattern(settings.targets), rank=settings.rank,
                                 alpha=settings.alpha, lora_a_initializer=LORA_A_INIT)
    return qwix.apply_lora_to_model(model, provider, *example_inputs(), rngs=nnx.Rngs(seed))


def adapter_tree(model: BlueLMForCausalLM) -> dict:
    """lora.py's tree {"a": {name: [layers, in, rank]}, "b": {name: [layers, rank, out]}} of
    the qwix LoRA weights of `model` (the projections that have them)."""
    layers = model.model.layers
    tree: dict = {"a": {}, "b": {}}
    for name, weight in P.LAYER_PROJECTIONS.items():
        linears = [functools.reduce(getattr, weight.path[:-1], layer) for layer in layers]  # its nnx.Linear per layer
        if not hasattr(linears[0], "kernel_lora_a"):
            continue
        tree["a"][name] = jnp.stack([linear.kernel_lora_a[...] for linear in linears])
        tree["b"][name] = jnp.stack([linear.kernel_lora_b[...] for linear in linears])
    if not tree["a"]:
        raise L.LoraError("the model has no qwix LoRA weights (see ecosystem.qwix_lora)")
    return tree


def _quantization_provider(qtype: str, tile_size: int | None, targets, lm_head: bool) -> qwix.PtqProvider:
    if qtype not in QUANT_TYPES:
        raise ValueError(f"weight type must be one of {', '.join(QUANT_TYPES)}, got {qtype!r}")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"tile_size must be a positive integer or None, got {tile_size!r}")
    return qwix.PtqProvider([qwix.QtRule(module_path=module_path_pattern(targets, lm_head),
                                         weight_qtype=qtype, tile_size=tile_size)])


def quantize_weights(model: BlueLMForCausalLM, qtype: str = "int8", tile_size: int | None = None,
                     targets: str | tuple | list = "all", lm_head: bool = False) -> BlueLMForCausalLM:
    """A copy of `model` with weight-only quantized projections (activations stay float).

    qtype: "int8" or "int4"; tile_size: None for one scale per output channel, else one per
    `tile_size` input rows (it must divide the input size; int4 wants 128); targets: the
    layer projections (as lora.parse_targets reads them); lm_head: quantize the head too."""
    P.require_kernel_layout(nnx.state(model, nnx.Param).to_pure_dict(), "qwix")
    provider = _quantization_provider(qtype, tile_size, targets, lm_head)
    return qwix.quantize_model(model, provider, *example_inputs())


def quantized_state(config: BlueLMConfig, params: dict, qtype: str = "int8", tile_size: int | None = None,
                    targets: str | tuple | list = "all", lm_head: bool = False,
                    compute_dtype=jnp.float32) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, state) of `quantize_weights` on the model holding `params` (a state dict as in
    params.py), quantizing each weight from `params` without building the float model:
    the quantized tree is traced from abstract shapes, then qwix.quantize_params fills it."""
    P.require_kernel_layout(params, "qwix")
    provider = _quantization_provider(qtype, tile_size, targets, lm_head)

    def quantized_tree():
        return nnx.split(qwix.quantize_model(BlueLMForCausalLM(config, dtype=compute_dtype), provider,
                                             *example_inputs()))

    graph, abstract = jax.eval_shape(quantized_tree)
    state = qwix.quantize_params(params, nnx.merge(graph, abstract))
    return graph, state
