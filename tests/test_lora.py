"""LoRA: targets, init as identity, only adapters move (base bit-identical), loss goes down, merge, save/load, dropout."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bluelm_jax import lora as L
from bluelm_jax import train as T
from bluelm_jax.config import preset
from bluelm_jax.model import forward
from bluelm_jax.tokenizer import BlueLMTokenizer
from tests.ft_helpers import params_from_hf, qa_records, tree_equal, write_jsonl
from tests.hf_reference import random_hf_weights

CONFIG = preset("tiny").replace(vocab_size=640)


@pytest.fixture(scope="module")
def model(tokenizer_model):
    return types.SimpleNamespace(config=CONFIG, tokenizer=BlueLMTokenizer(tokenizer_model), path="",
                                 params=params_from_hf(CONFIG, random_hf_weights(CONFIG, 2)))


def logits(params, adapters=None, tokens=None):
    tokens = jnp.asarray([[1, 50, 60, 70, 80, 90, 100, 110]]) if tokens is None else tokens
    return forward(params, tokens, jnp.arange(tokens.shape[1])[None], CONFIG, adapters=adapters)[0]


def test_targets_and_settings():
    assert L.parse_targets("q,k,gate") == ("q_proj", "k_proj", "gate_proj")
    assert L.parse_targets("all") == L.PROJECTIONS
    assert L.LoraConfig(targets="down,q").targets == ("q_proj", "down_proj")
    for bad in (dict(targets="q,x"), dict(rank=0), dict(alpha=0.0), dict(dropout=1.0)):
        with pytest.raises(L.LoraError):
            L.LoraConfig(**bad)


def test_fresh_adapters_leave_the_model_unchanged_and_merge_matches(model):
    cfg = L.LoraConfig(rank=4, alpha=8.0, targets="all")
    tree = L.init(jax.random.key(0), CONFIG, cfg)
    assert tree["a"]["q_proj"].shape == (2, 256, 4) and tree["b"]["down_proj"].shape == (2, 4, 256)
    np.testing.assert_array_equal(logits(model.params, L.as_adapters(tree, cfg)), logits(model.params))
    tree["b"] = jax.tree.map(lambda b: 0.05 * jax.random.normal(jax.random.key(1), b.shape), tree["b"])
    with_adapters = logits(model.params, L.as_adapters(tree, cfg))
    assert not np.allclose(with_adapters, logits(model.params), atol=1e-3)
    np.testing.assert_allclose(logits(L.merge(model.params, tree, cfg)), with_adapters, rtol=2e-4, atol=2e-4)


def test_dropout_only_with_a_key():
    cfg = L.LoraConfig(rank=4, dropout=0.5, targets="q,v")
    tree = L.init(jax.random.key(0), CONFIG, cfg)
    tree["b"] = jax.tree.map(lambda b: 0.1 * jnp.ones_like(b), tree["b"])
    params = params_from_hf(CONFIG, random_hf_weights(CONFIG, 0))
    plain = logits(params, L.as_adapters(tree, cfg))
    np.testing.assert_array_equal(plain, logits(params, L.as_adapters(tree, cfg)))
    d1 = logits(params, L.as_adapters(tree, cfg, jax.random.key(1)))
    d2 = logits(params, L.as_adapters(tree, cfg, jax.random.key(2)))
    assert not np.allclose(d1, plain) and not np.allclose(d1, d2)


def test_lora_training_moves_only_adapters_and_lowers_loss(model, tmp_path):
    before = jax.tree.map(lambda x: np.array(x, copy=True), model.params)
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(2))
    tc = T.TrainConfig(seq_len=64, batch_size=4, learning_rate=3e-2, warmup_steps=2, max_steps=25, mesh="data=1",
                       lora=L.LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets="q,k,v,o,gate,up,down"),
                       merge_lora=True)
    result = T.train(model, data, tc, out_dir=str(tmp_path / "run"), progress=False, log=lambda s: None)
    assert tree_equal(model.params, before)  # the base is bit-identical
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.75, losses  # from ~ln(640) on a random base
    assert set(result.params) == {"a", "b"} and all(np.abs(b).max() > 0 for b in jax.tree.leaves(result.params["b"]))

    tree, cfg, base = L.load(result.adapter_dir, CONFIG)  # only adapters are saved
    assert cfg == tc.lora and tree_equal(tree, result.params)
    import bluelm_jax

    merged = bluelm_jax.load(result.model_dir)
    np.testing.assert_allclose(logits(merged.params), logits(model.params, L.as_adapters(tree, cfg)),
                               rtol=2e-4, atol=2e-4)


def test_load_bad_adapter_dir(tmp_path):
    with pytest.raises(L.LoraError, match="not a LoRA adapter directory"):
        L.load(str(tmp_path), CONFIG)
    cfg = L.LoraConfig(rank=2)
    L.save(tmp_path / "ad", L.init(jax.random.key(0), CONFIG, cfg), cfg)
    with pytest.raises(L.LoraError, match="do not match"):
        L.load(tmp_path / "ad", CONFIG.replace(hidden_size=128, intermediate_size=256))
