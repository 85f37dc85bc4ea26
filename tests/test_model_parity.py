"""End-to-end parity with the transformers LLaMA reference (+ embedding LayerNorm), float32.

The checkpoint is written by the test in Hugging Face layout (two safetensors shards) and
goes through the same loading code that real checkpoints use: `load()` of the HF
directory, and the converter's Orbax output.
"""

import numpy as np
import pytest
import torch

import bluelm_jax
from bluelm_jax.config import preset
from bluelm_jax.hf.to_orbax import convert_hf_to_flax
from tests.hf_reference import assert_reference_rope_intact, random_hf_weights, reference_model

SEQ = 320
TOL = 1e-4


def reference_logits(name: str, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    config = preset(name)
    model = reference_model(config, random_hf_weights(config, seed=0))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(positions)).logits
    assert_reference_rope_intact(model)
    return out.numpy()


def inputs(name: str, far: bool) -> tuple[np.ndarray, np.ndarray]:
    """[2, SEQ] random ids, and positions starting at 0 or near 30,000 (32K models)."""
    config = preset(name)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, SEQ))
    first = 29_600 if far else 0
    return ids, np.broadcast_to(first + np.arange(SEQ), (2, SEQ)).copy()


def assert_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name, far", [("tiny", False), ("tiny-32k", False), ("tiny-32k", True), ("tiny-gqa", False)])
def test_hf_directory_matches_reference(hf_checkpoint, name, far):
    model = bluelm_jax.load(hf_checkpoint(name))
    ids, positions = inputs(name, far)
    ours = np.asarray(model.logits(ids, positions=positions))
    assert_parity(ours, reference_logits(name, ids, positions))


@pytest.mark.parametrize("name", ["tiny", "tiny-32k"])
def test_converted_orbax_matches_reference(hf_checkpoint, tmp_path, name):
    out = tmp_path / "orbax"
    convert_hf_to_flax(hf_checkpoint(name), str(out), dtype="float32")
    model = bluelm_jax.load(str(out))
    ids, positions = inputs(name, far=name.endswith("32k"))
    assert_parity(np.asarray(model.logits(ids, positions=positions)), reference_logits(name, ids, positions))
