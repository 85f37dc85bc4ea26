"""qwix's LoRA and weight-only quantization on the module tree (bluelm_jax/ecosystem.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bluelm_jax import ecosystem as E
from bluelm_jax import lora as L
from bluelm_jax import params as P
from bluelm_jax.config import preset
from bluelm_jax.layout import to_layout
from bluelm_jax.model import build, forward, init_params
from bluelm_jax.train import masked_cross_entropy

CONFIG = preset("tiny")
# qwix 0.1.8 calls flax APIs that 0.12.8 deprecates (Variable.value, VariableState, m.iter_modules())
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a kind of Param


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


@pytest.fixture(scope="module")
def batch():
    """(tokens, positions) [2, 12] int32."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, CONFIG.vocab_size, (2, 12)), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape)


def _linears(module):
    """{(layer, projection name): nnx.Linear} of every layer projection."""
    return {(i, name): layer.self_attn.__dict__.get(name) or layer.mlp.__dict__.get(name)
            for i, layer in enumerate(module.model.layers) for name in P.LAYER_PROJECTIONS}


def _jitted_logits(module):
    """module's logits through one jit over its nnx.split state, as the project compiles."""
    graph, state = nnx.split(module)
    return jax.jit(lambda state, tokens, positions: nnx.merge(graph, state)(tokens, positions)[0])


def test_fresh_qwix_lora_leaves_logits_unchanged_on_the_target_projections_only(params, batch):
    model = build(CONFIG, params)
    lora_model = E.qwix_lora(model, rank=4, alpha=8.0, targets="q,v,down")
    np.testing.assert_array_equal(np.asarray(lora_model(*batch)[0]), np.asarray(model(*batch)[0]))
    for (i, name), linear in _linears(lora_model).items():
        has_adapter = name in ("q_proj", "v_proj", "down_proj")
        assert hasattr(linear, "kernel_lora_a") == has_adapter, (i, name)
        if has_adapter:
            fan_in, fan_out = linear.kernel.shape
            a, b = linear.kernel_lora_a, linear.kernel_lora_b
            assert isinstance(a, nnx.LoRAParam) and a.shape == (fan_in, 4) and b.shape == (4, fan_out)
            assert not np.any(np.asarray(b[...]))
            # lora.init's A: uniform within 1/sqrt(in)
            assert 0.8 / np.sqrt(fan_in) < np.max(np.abs(np.asarray(a[...]))) <= 1.0 / np.sqrt(fan_in)
            axes = P.LAYER_PROJECTIONS[name].axes  # the kernel's logical axes carry over
            assert a.get_metadata()["out_sharding"] == (axes[0], None)
            assert b.get_metadata()["out_sharding"] == (None, axes[1])
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "kernel_lora_a")  # the input is untouched


def test_qwix_lora_equals_our_adapters_and_their_merge(params, batch):
    """qwix's y = x W + (alpha / rank) x A B is lora.py's: the same weights, gathered by
    adapter_tree, give the same logits through the model's Adapters and through lora.merge."""
    lora_model = E.qwix_lora(build(CONFIG, params), rank=4, alpha=12.0, targets="all", seed=3)
    rng = np.random.default_rng(1)
    for linear in _linears(lora_model).values():
        linear.kernel_lora_b[...] = jnp.asarray(rng.normal(0, 0.5, linear.kernel_lora_b.shape), jnp.float32)
    logits = lora_model(*batch)[0]
    assert float(jnp.max(jnp.abs(logits - forward(params, *batch, CONFIG)[0]))) > 0.05  # the adapters matter

    tree = E.adapter_tree(lora_model)
    settings = L.LoraConfig(rank=4, alpha=12.0, targets="all")
    assert jax.tree.map(jnp.shape, tree) == jax.tree.map(jnp.shape, L.init(jax.random.key(0), CONFIG, settings))
    with_adapters = forward(params, *batch, CONFIG, adapters=L.as_adapters(tree, settings))[0]
    merged = forward(L.merge(params, tree, settings), *batch, CONFIG)[0]
    np.testing.assert_allclose(np.asarray(with_adapters), np.asarray(logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(logits), atol=1e-4, rtol=0)


def test_training_the_qwix_lora_params_changes_only_them(params, batch):
    """nnx.Optimizer over nnx.LoRAParam, in a jit over split state: the loss falls, the LoRA
    weights move, every base weight stays bit-identical."""
    lora_model = E.qwix_lora(build(CONFIG, params), rank=4, alpha=8.0, targets="all")
    optimizer = nnx.Optimizer(lora_model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    base_before = nnx.state(lora_model, BASE_PARAMS).to_pure_dict()
    lora_before = nnx.state(lora_model, nnx.LoRAParam).to_pure_dict()
    tokens, positions = batch
    inputs, targets, positions = tokens[:, :-1], tokens[:, 1:], positions[:, :-1]
    graph, state = nnx.split((lora_model, optimizer))

    @jax.jit
    def step(state):
        model, optimizer = nnx.merge(graph, state)

        def loss_fn(m):
            return masked_cross_entropy(m(inputs, positions)[0], targets, jnp.ones(targets.shape))[0]

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    losses = []
    for _ in range(5):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    nnx.update((lora_model, optimizer), state)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(lora_model, BASE_PARAMS).to_pure_dict(), base_before)
    lora_after = nnx.state(lora_model, nnx.LoRAParam).to_pure_dict()
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                           lora_after, lora_before))
    assert len(changed) == 2 * 7 * CONFIG.num_hidden_layers and all(changed)


@pytest.mark.parametrize("qtype, tile_size, tolerance", [("int8", None, 5e-3), ("int4", 128, 6e-2)])
def test_weight_only_quantization_stores_integers_and_stays_close(params, batch, qtype, tile_size, tolerance):
    """Every layer projection holds qtype values [in, out] and float32 scales [in / tile, out];
    the embedding, norms and head stay float. Max |logit - float logit| measured on this
    model (|logits| up to 1.35): int8 per channel 1.5e-3, int4 in groups of 128 2.4e-2."""
    model = build(CONFIG, params)
    quantized = E.quantize_weights(model, qtype, tile_size)
    for (i, name), linear in _linears(quantized).items():
        fan_in, fan_out = P.shape_of(P.LAYER_PROJECTIONS[name], CONFIG)
        values, scale = linear.kernel.array.qvalue, linear.kernel.array.scale
        assert values.dtype == jnp.dtype(qtype) and values.shape == (fan_in, fan_out), (i, name)
        assert scale.dtype == jnp.float32 and scale.shape == (fan_in // (tile_size or fan_in), fan_out), (i, name)
    for path, leaf in P.flatten(nnx.state(quantized, nnx.Param).to_pure_dict()):
        if "kernel" not in path or path[0] == "lm_head":
            assert leaf.dtype == jnp.float32, path

    reference = np.asarray(model(*batch)[0])
    logits = np.asarray(quantized(*batch)[0])
    error = np.max(np.abs(logits - reference))
    assert 1e-5 < error < tolerance, error  # quantized (not float), yet close
    compiled = np.asarray(_jitted_logits(quantized)(nnx.split(quantized)[1], *batch))
    np.testing.assert_allclose(compiled, logits, atol=1e-5, rtol=0)


def test_qwix_reaches_bfloat16_weights_under_float32_compute_on_cpu(batch):
    """There the projections run as model._bf16_weight_matmul, whose product must still be the
    jax.lax.dot_general qwix intercepts (inside jnp.matmul's jit qwix cannot add its weights)."""
    model = build(CONFIG, init_params(CONFIG, seed=0, param_dtype=jnp.bfloat16))
    reference = np.asarray(model(*batch)[0])
    np.testing.assert_array_equal(np.asarray(E.qwix_lora(model, rank=4, targets="all")(*batch)[0]), reference)
    quantized = E.quantize_weights(model, "int8")
    assert quantized.model.layers[1].mlp.up_proj.kernel.array.qvalue.dtype == jnp.int8
    error = np.max(np.abs(np.asarray(quantized(*batch)[0]) - reference))
    assert 1e-5 < error < 1e-2, error  # measured 3.0e-3
    weight_layout = build(CONFIG, to_layout(init_params(CONFIG, seed=0, param_dtype=jnp.bfloat16), P.WEIGHT))
    for qwix_function in (E.qwix_lora, E.quantize_weights):  # qwix's providers match the kernel layout
        with pytest.raises(ValueError, match="qwix needs the parameters in the kernel layout"):
            qwix_function(weight_layout)


def test_quantized_state_from_float_params_equals_quantizing_the_model(params, batch):
    graph, state = E.quantized_state(CONFIG, params, "int8", lm_head=True)
    quantized = E.quantize_weights(build(CONFIG, params), "int8", lm_head=True)
    assert state["lm_head"]["kernel"]["array"]["qvalue"].dtype == jnp.int8
    jax.tree.map(np.testing.assert_array_equal, state, nnx.state(quantized).to_pure_dict())
    np.testing.assert_array_equal(np.asarray(nnx.merge(graph, state)(*batch)[0]),
                                  np.asarray(quantized(*batch)[0]))


def test_bad_quantization_settings_are_refused(params):
    model = build(CONFIG, params)
    with pytest.raises(ValueError, match="weight type must be one of int8, int4, got 'int3'"):
        E.quantize_weights(model, "int3")
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        E.quantize_weights(model, "int4", tile_size=0)
    with pytest.raises(L.LoraError, match="unknown LoRA target 'lm'"):
        E.qwix_lora(model, targets="q,lm")
