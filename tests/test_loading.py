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
from bluelm_jax.hf.to_orbax import convert_hf_to_flax
from bluelm_jax.layout import to_layout
from bluelm_jax.model import TorchLinear
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
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


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


def test_bfloat16_on_cpu_loads_in_the_weight_layout(dirs):
    """bfloat16 weights under float32 compute on CPU are stored [out, in] (TorchLinear), from an
    Orbax dir and from a Hugging Face dir alike: the kernel layout's values transposed, the same logits."""
    hf, out = dirs
    a, b = bluelm_jax.load(out, dtype="bfloat16"), bluelm_jax.load(hf, dtype="bfloat16")
    assert a.layout == b.layout == "weight" and "(weight layout: projections [out, in])" in repr(a)
    assert_trees_equal(a.params, b.params)
    up = a.module.model.layers[0].mlp.up_proj
    assert isinstance(up, TorchLinear) and up.weight.shape == (CONFIG.intermediate_size, CONFIG.hidden_size)
    kernel = bluelm_jax.load(out, dtype="bfloat16", layout="kernel")
    assert kernel.layout == "kernel" and kernel.module.model.layers[0].mlp.up_proj.kernel.shape == up.weight.shape[::-1]
    ids = [a.tokenizer.encode("BlueLM runs in JAX. 你好")]
    np.testing.assert_allclose(np.asarray(a.logits(ids)), np.asarray(kernel.logits(ids)), rtol=1e-5, atol=1e-5)
    assert_trees_equal(to_layout(kernel.params, "weight"), a.params)
    assert bluelm_jax.load(out).layout == "kernel"  # float32 weights
    assert bluelm_jax.load(out, dtype="bfloat16", compute_dtype="bfloat16").layout == "kernel"
    with pytest.raises(ValueError, match="unknown projection layout 'columns'"):
        bluelm_jax.load(out, layout="columns")


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
    """Matrices split over 'data' and 'model'; vectors replicated."""
    tree: dict = {}
    for path, shape in flatten(param_shapes(CONFIG)):
        if len(shape) == 2:
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
    q_proj = ("model", "layers", 1, "self_attn", "q_proj", "kernel")
    assert get_path(model.params, q_proj).sharding == get_path(shardings, q_proj)


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
    with pytest.raises(checkpoint.CheckpointError, match="layout version 999, this bluelm-jax reads version 2"):
        bluelm_jax.load(out)


def test_a_layout_1_checkpoint_is_refused_in_one_line(dirs, tmp_path):
    """A directory converted by the previous layout (layers stacked on a leading axis,
    layers/q_proj ...) is refused with one line that says to convert again, by load() and by the CLI."""
    import shutil
    import subprocess
    import sys

    new = checkpoint.restore_params(dirs[1], CONFIG)
    stacked = {}
    for layer in new["model"]["layers"].values():
        for path, leaf in flatten(layer):
            stacked.setdefault(path[-2], []).append(np.asarray(leaf))
    old_tree = {"embed_tokens": np.asarray(new["model"]["embed_tokens"]["embedding"]),
                "embed_layer_norm": {k: np.asarray(v) for k, v in new["model"]["embed_layer_norm"].items()},
                "layers": {name: np.stack(leaves) for name, leaves in stacked.items()},
                "norm": np.asarray(new["model"]["norm"]["weight"]), "lm_head": np.asarray(new["lm_head"]["kernel"])}
    out = tmp_path / "old"
    out.mkdir()
    checkpoint.save_params(out / checkpoint.PARAMS_DIR, old_tree)
    for name in (checkpoint.CONFIG_FILE, checkpoint.TOKENIZER_FILE):
        shutil.copy(os.path.join(dirs[1], name), out / name)
    (out / checkpoint.METADATA_FILE).write_text(json.dumps(
        {"format": "bluelm-jax", "layout_version": 1, "param_dtype": "float32"}))
    message = r"layout version 1, this bluelm-jax reads version 2; convert the Hugging Face checkpoint again"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        bluelm_jax.load(out)
    run = subprocess.run([sys.executable, "-m", "bluelm_jax", "generate", "--model", str(out), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "convert the Hugging Face checkpoint again" in lines[0], run.stderr


def test_config_disagrees_with_params(dirs, tmp_path):
    out = _copy_converted(dirs[1], tmp_path / "c")
    cfg = CONFIG.replace(intermediate_size=384).to_hf_dict()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"parameter model/layers/0/mlp/down_proj/kernel has shape "
                                                         r"\(512, 256\), config.json implies \(384, 256\)"):
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


def test_repr_counts_parameters(dirs):
    assert f"{CONFIG.num_parameters():,} parameters" in repr(bluelm_jax.load(dirs[1]))
