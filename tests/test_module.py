"""The Flax NNX module tree: its names against PyTorch's, its sharding metadata, and training it with nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bluelm_jax import params as P
from bluelm_jax.config import preset
from bluelm_jax.model import BlueLMForCausalLM, abstract_model, forward, init_params
from bluelm_jax.train import masked_cross_entropy
from tests.hf_reference import random_hf_weights, reference_model


def _module_params(module) -> dict:
    """{path: Param} of every parameter, found by walking the module tree."""
    return {tuple(path): var for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)}


def test_module_paths_map_one_to_one_onto_hugging_face_names():
    """Every parameter of the tree is named like its tensor in a BlueLM checkpoint: the
    transformers LLaMA model's state dict plus BlueLM's model.embed_layer_norm, same count,
    no name twice, shapes equal up to the [in, out] transpose of Linear kernels."""
    config = preset("tiny-gqa")
    assert config.use_stable_embedding
    reference = reference_model(config, random_hf_weights(config))
    torch_shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    torch_shapes = {("model." + n if n.startswith("embed_layer_norm.") else n): s for n, s in torch_shapes.items()}
    assert "model.embed_layer_norm.bias" in torch_shapes and "lm_head.weight" in torch_shapes

    module = abstract_model(config)
    ours = _module_params(module)
    names = {P.hf_name(path): path for path in ours}
    assert len(names) == len(ours)  # one-to-one
    assert set(names) == set(torch_shapes)
    for name, path in names.items():
        shape = tuple(ours[path].shape)
        kind = path[-1]
        assert kind in ("kernel", "embedding", "weight", "bias"), path
        assert (shape[::-1] if kind == "kernel" else shape) == torch_shapes[name], name
    # the table declares exactly these weights, with the same logical axes as the modules carry
    assert {path for path, _ in P.weights(config)} == set(ours)
    for path, var in ours.items():
        assert var.get_metadata()["out_sharding"] == P.weight_at(path).axes, path
    # navigable like the PyTorch model
    assert isinstance(module.model.layers[1].self_attn.q_proj, nnx.Linear)
    assert isinstance(module.model.embed_tokens, nnx.Embed) and isinstance(module.lm_head, nnx.Linear)
    assert len(module.model.layers) == config.num_hidden_layers


def test_nnx_optimizer_trains_the_model():
    """optax AdamW through nnx.Optimizer, in a jitted step over (nnx.split) state, lowers the
    loss on a fixed batch; the trained state runs through the functional forward identically."""
    config = preset("tiny")
    module = BlueLMForCausalLM(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(module, optax.adamw(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, config.vocab_size, (4, 17)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), inputs.shape)
    graphdef, state = nnx.split((module, optimizer))

    @jax.jit
    def step(state):
        module, optimizer = nnx.merge(graphdef, state)

        def loss_fn(m):
            logits, _ = m(inputs, positions)
            return masked_cross_entropy(logits, targets, jnp.ones(targets.shape))[0]

        loss, grads = nnx.value_and_grad(loss_fn)(module)
        optimizer.update(module, grads)
        return nnx.state((module, optimizer)), loss

    losses = []
    for _ in range(8):
        state, loss = step(state)
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1.0, losses

    nnx.update((module, optimizer), state)
    trained = nnx.state(module, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(np.asarray(forward(trained, inputs, positions, config)[0]),
                                  np.asarray(module(inputs, positions)[0]))


def test_profiles_read_like_the_model():
    """jax.named_scope on each layer, its attention and its MLP: the compiled program's op names
    say where each op comes from (what a profiler shows)."""
    import re

    config = preset("tiny")
    params = init_params(config)
    tokens = jnp.ones((1, 4), jnp.int32)
    lowered = jax.jit(forward, static_argnames=("config",)).lower(params, tokens, jnp.arange(4)[None], config)
    names = set(re.findall(r'loc\("([^"]*)"', lowered.as_text(debug_info=True)))
    for i in range(config.num_hidden_layers):
        for block, op in (("attention", "dot_general"), ("mlp", "jit(silu)")):
            assert any(n.startswith(f"jit(forward)/layer_{i}/{block}/") and n.endswith(op) for n in names), (i, block)
