"""bfloat16-stored weights with float32 compute on CPU: no weight is ever converted to float32,
and the results match float32 weights of the same values within bfloat16 tolerance, with the
projections in either layout (load() stores them [out, in] there: params.WEIGHT)."""

import types

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bluelm_jax import generate as G
from bluelm_jax import params as P
from bluelm_jax.config import preset
from bluelm_jax.layout import to_layout
from bluelm_jax.model import forward
from tests.hf_reference import params_from_hf, random_hf_weights

CONFIG = preset("tiny")


def bf16_rounded_weights(config, seed=0) -> dict[str, np.ndarray]:
    """The test weights rounded to bfloat16 (kept in float32), so both models hold the same values."""
    return {n: w.astype(ml_dtypes.bfloat16).astype(np.float32) for n, w in random_hf_weights(config, seed).items()}


@pytest.fixture(scope="module")
def params32():
    return params_from_hf(CONFIG, bf16_rounded_weights(CONFIG))


def as_bf16(params, layout=P.KERNEL):
    return to_layout(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), layout)


def weight_converts(params, tokens) -> list[tuple]:
    """(shape, from, to) of every dtype conversion in forward's program of an operand as large as a projection."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    jaxpr = jax.make_jaxpr(lambda p: forward(p, tokens, positions, CONFIG, compute_dtype=jnp.float32))(params)
    projection_size = CONFIG.hidden_size * CONFIG.hidden_size
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "convert_element_type":
                aval = eqn.invars[0].aval
                if aval.size >= projection_size and aval.dtype == jnp.bfloat16:
                    found.append((aval.shape, aval.dtype, eqn.params["new_dtype"]))
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("layout", P.LAYOUTS)
def test_no_weight_is_converted_to_float32(params32, layout):
    params = as_bf16(params32, layout)
    tokens = jnp.ones((1, 3), jnp.int32)
    assert weight_converts(params, tokens) == []
    assert weight_converts(params32, tokens) == []  # float32 weights stay float32 (nothing to convert)


@pytest.mark.parametrize("layout", P.LAYOUTS)
@pytest.mark.parametrize("batch, seq", [(1, 1), (3, 1), (2, 9)])
def test_logits_match_float32_within_bf16_tolerance(params32, batch, seq, layout):
    tokens = jnp.asarray(np.random.default_rng(batch * seq).integers(0, CONFIG.vocab_size, (batch, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq), tokens.shape)
    ref, _ = forward(params32, tokens, positions, CONFIG, compute_dtype=jnp.float32)
    got, _ = forward(as_bf16(params32, layout), tokens, positions, CONFIG, compute_dtype=jnp.float32)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    err = np.abs(np.asarray(got) - np.asarray(ref)).max()
    scale = np.abs(np.asarray(ref)).max()
    assert err <= 2e-2 * scale, (err, scale)  # activations rounded to bfloat16 before each product
    assert err > 0  # the bfloat16 path did run (float32 weights would give identical logits)


@pytest.mark.parametrize("layout", P.LAYOUTS)
def test_greedy_tokens_equal_float32(params32, layout):
    def model(params):
        return types.SimpleNamespace(config=CONFIG, params=params, tokenizer=None, compute_dtype=jnp.float32)

    params16 = as_bf16(params32, layout)
    prompts = [[1, 5, 9, 200, 31], [1, 77, 3]]
    ours = G.generate(model(params16), prompts, max_new_tokens=24).ids
    ref = G.generate(model(params32), prompts, max_new_tokens=24).ids
    assert ours == ref
    assert len(set(ours[0])) > 5  # not a degenerate repetition


def test_layouts_round_trip_and_only_the_kernel_layout_trains_or_saves(params32, tmp_path):
    """to_layout moves every projection (q_proj/kernel [in, out] <-> q_proj/weight [out, in]) and
    back exactly; fine-tuning, checkpoints and qwix refuse the weight layout in one line."""
    from bluelm_jax import checkpoint
    from bluelm_jax import train as T

    kernel = jax.tree.map(jnp.asarray, params32)
    weight = to_layout(jax.tree.map(jnp.array, kernel), P.WEIGHT)
    assert P.layout_of(weight) == P.WEIGHT and P.layout_of(kernel) == P.KERNEL
    moved = {path for path, _ in P.flatten(weight)} - {path for path, _ in P.flatten(kernel)}
    assert len(moved) == 7 * CONFIG.num_hidden_layers + 1  # every projection and lm_head
    for path in moved:
        assert path[-1] == P.WEIGHT and path[-2] in P.PROJECTIONS
        np.testing.assert_array_equal(np.asarray(P.get_path(weight, path)),
                                      np.asarray(P.get_path(kernel, P.path_in(path, P.KERNEL))).T)
    back = to_layout(weight, P.KERNEL)
    for (pa, a), (pb, b) in zip(P.flatten(back), P.flatten(kernel)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    weight = to_layout(back, P.WEIGHT)
    model = types.SimpleNamespace(config=CONFIG, params=weight, tokenizer=None)
    with pytest.raises(ValueError, match="fine-tuning needs the parameters in the kernel layout"):
        T.train(model, str(tmp_path / "unused.jsonl"), T.TrainConfig())
    with pytest.raises(ValueError, match="a checkpoint needs the parameters in the kernel layout"):
        checkpoint.save_params(tmp_path / "params", weight)
    assert not (tmp_path / "params").exists()
