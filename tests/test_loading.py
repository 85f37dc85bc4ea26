"""bluelm_jax.load(): converted Orbax dirs and Hugging Face dirs, sharded restores, logits."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bluelm_jax
from bluelm_jax import checkpoint
from bluelm_jax.config import preset
from bluelm_jax.params import flatten, get_path, param_shapes, set_path
from convert.hf_to_flax import convert_hf_to_flax
from tests.hf_reference import write_hf_checkpoint

CONFIG = preset("tiny")  # vocab 640 >= the test tokenizer's 600 pieces


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer_model) -> tuple[str, str]:
    """(Hugging Face dir, its conversion), float32."""
    root = tmp_path_factory.mktemp("load")
    hf = write_hf_checkpoint(str(root / "hf"), CONFIG, tokenizer_model)
    out = str(root / "converted")
    convert_hf_to_flax(hf, out, progress=False)
    return hf, out


def assert_trees_equal(a: dict, b: dict) -> None:
    fa, fb = dict(flatten(a)), dict(flatten(b))
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg="/".join(path))


def test_orbax_and_hf_dirs_load_the_same(dirs):
    hf, out = dirs
    a, b = bluelm_jax.load(out), bluelm_jax.load(hf)
    assert a.config == b.config == CONFIG
    assert_trees_equal(a.params, b.params)
    assert a.param_dtype == b.param_dtype == jnp.float32
    assert a.compute_dtype == jnp.float32  # CPU default
    assert a.tokenizer.encode("hello world")[0] == CONFIG.bos_token_id
    assert a.tokenizer.encode("hello world") == b.tokenizer.encode("hello world")
    for _, leaf in flatten(a.params):
        assert isinstance(leaf, jax.Array) and leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_dtype_override(dirs):
    hf, out = dirs
    a, b = bluelm_jax.load(out, dtype="bfloat16"), bluelm_jax.load(hf, dtype=jnp.bfloat16)
    assert a.param_dtype == b.param_dtype == jnp.bfloat16
    assert_trees_equal(a.params, b.params)
    assert bluelm_jax.load(out, compute_dtype="bfloat16").compute_dtype == jnp.bfloat16


def test_logits(dirs):
    model = bluelm_jax.load(dirs[1])
    ids = model.tokenizer.encode("BlueLM runs in JAX. 你好")
    short = ids[:3]
    batch = model.logits([ids, short])
    assert batch.shape == (2, len(ids), CONFIG.vocab_size) and batch.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(batch)))
    alone = model.logits(np.asarray([short], np.int32))
    np.testing.assert_allclose(np.asarray(batch[1, :3]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch[0]), np.asarray(model.logits([ids])[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model.logits([])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 640\)"):
        model.logits([[1, 640]])


def _mesh_shardings(mesh: Mesh) -> dict:
    """Matrices split over 'model' on their last axis, the layer axis over 'data'; vectors replicated."""
    tree: dict = {}
    for path, shape in flatten(param_shapes(CONFIG)):
        if path[0] == "layers" and len(shape) == 3:
            spec = P(None, None, "model")
        elif len(shape) == 2:
            spec = P("data", "model")
        else:
            spec = P()
        set_path(tree, path, NamedSharding(mesh, spec))
    return tree


def test_restore_into_named_shardings(dirs):
    """Each device gets only its shard; the values equal a single-device restore."""
    assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    shardings = _mesh_shardings(mesh)
    sharded = checkpoint.restore_params(dirs[1], CONFIG, shardings=shardings)
    single = checkpoint.restore_params(dirs[1], CONFIG)
    for path, leaf in flatten(sharded):
        target = get_path(shardings, path)
        assert leaf.sharding == target, path
        shard_shape = target.shard_shape(leaf.shape)
        assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(get_path(single, path)))
    model = bluelm_jax.load(dirs[0], shardings=shardings)
    assert get_path(model.params, ("layers", "q_proj")).sharding == get_path(shardings, ("layers", "q_proj"))


def _copy_converted(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_layout_version_mismatch(dirs, tmp_path):
    out = _copy_converted(dirs[1], tmp_path / "c")
    meta_path = os.path.join(out, checkpoint.METADATA_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    meta["layout_version"] = 999
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(checkpoint.CheckpointError, match="layout version 999, this bluelm-jax reads version 1"):
        bluelm_jax.load(out)


def test_config_disagrees_with_params(dirs, tmp_path):
    out = _copy_converted(dirs[1], tmp_path / "c")
    cfg = CONFIG.replace(intermediate_size=384).to_hf_dict()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"parameter layers/down_proj has shape \(2, 512, 256\), "
                                                         r"config.json implies \(2, 384, 256\)"):
        bluelm_jax.load(out)


def test_bad_paths(dirs, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a directory"):
        bluelm_jax.load(tmp_path / "nowhere")
    out = _copy_converted(dirs[1], tmp_path / "c")
    os.remove(os.path.join(out, "tokenizer.model"))
    with pytest.raises(checkpoint.CheckpointError, match="tokenizer.model: missing"):
        bluelm_jax.load(out)


def test_save_params_round_trip(dirs, tmp_path, tokenizer_model):
    """An in-memory tree saved with save_params (e.g. after fine-tuning) loads like a conversion."""
    import shutil

    model = bluelm_jax.load(dirs[0])
    out = tmp_path / "saved"
    out.mkdir()
    checkpoint.save_params(out / checkpoint.PARAMS_DIR, model.params)
    shutil.copy(os.path.join(dirs[0], "config.json"), out / "config.json")
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    checkpoint.write_metadata(out, "float32")
    assert_trees_equal(bluelm_jax.load(out).params, model.params)


def test_logits_with_positions(dirs):
    """Explicit positions equal to the default give the same logits; other spacings differ."""
    model = bluelm_jax.load(dirs[1])
    ids = np.asarray([model.tokenizer.encode("positions matter here")], np.int32)
    default = np.asarray(model.logits(ids))
    same = np.asarray(model.logits(ids, positions=np.arange(ids.shape[1])[None]))
    shifted = np.asarray(model.logits(ids, positions=3 * np.arange(ids.shape[1])[None]))  # RoPE is relative
    np.testing.assert_array_equal(default, same)
    assert np.abs(default - shifted).max() > 1e-4
    with pytest.raises(ValueError, match="positions must have the shape"):
        model.logits(ids, positions=np.arange(3)[None])


@pytest.mark.parametrize("which", [0, 1])
def test_per_layer_load_gives_the_same_logits(dirs, which):
    stacked, per_layer = bluelm_jax.load(dirs[which]), bluelm_jax.load(dirs[which], per_layer=True)
    assert isinstance(per_layer.params["layers"], list) and len(per_layer.params["layers"]) == CONFIG.num_hidden_layers
    ids = [stacked.tokenizer.encode("BlueLM runs in JAX. 你好")]
    np.testing.assert_allclose(np.asarray(per_layer.logits(ids)), np.asarray(stacked.logits(ids)), atol=1e-5)


def test_repr_counts_parameters_in_either_layout(dirs):
    expected = f"{CONFIG.num_parameters():,} parameters"
    assert expected in repr(bluelm_jax.load(dirs[1]))
    assert expected in repr(bluelm_jax.load(dirs[1], per_layer=True))
