"""Tunix's PeftTrainer fine-tunes the module tree with qwix LoRA adapters (the `tunix` extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

tunix = pytest.importorskip("tunix", reason="google-tunix is not installed (pip install '.[tunix]')")

from bluelm_jax import ecosystem as E  # noqa: E402
from bluelm_jax.config import preset  # noqa: E402
from bluelm_jax.model import build, init_params  # noqa: E402
from bluelm_jax.train import masked_cross_entropy  # noqa: E402

# qwix 0.1.8 and tunix 0.1.7 call flax APIs that 0.12.8 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _loss(model, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """Next-token cross-entropy of `model` on tokens [batch, seq], over positions with weight 1."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1] - 1, dtype=jnp.int32), tokens[:, :-1].shape)
    logits, _ = model(tokens[:, :-1], positions)
    return masked_cross_entropy(logits, tokens[:, 1:], weights[:, 1:])[0]


def test_peft_trainer_fine_tunes_the_lora_adapters():
    config = preset("tiny")
    model = E.qwix_lora(build(config, init_params(config, seed=0)), rank=4, alpha=8.0, targets="all")
    rng = np.random.default_rng(0)
    batches = [{"tokens": jnp.asarray(rng.integers(4, config.vocab_size, (2, 17)), jnp.int32),
                "weights": jnp.ones((2, 17), jnp.float32)} for _ in range(2)]
    base_before = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))).to_pure_dict()
    loss_before = [float(_loss(model, **b)) for b in batches]

    settings = tunix.TrainingConfig(eval_every_n_steps=100, max_steps=6, pbar_description=None)
    trainer = tunix.PeftTrainer(model, optax.adam(1e-2), settings).with_loss_fn(_loss)
    trainer.train(batches * 3)

    assert trainer.train_steps == 6
    loss_after = [float(_loss(model, **b)) for b in batches]
    assert all(after < before - 0.1 for before, after in zip(loss_before, loss_after)), (loss_before, loss_after)
    # only the adapters were trained
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))).to_pure_dict(), base_before)
    assert any(np.any(np.asarray(b)) for b in jax.tree.leaves(E.adapter_tree(model)["b"]))
