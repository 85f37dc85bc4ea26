"""Meshes, the sharding rule of every parameter, and the library's generation sharded over 8 simulated devices."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bluelm_jax import checkpoint, sharding
from bluelm_jax.config import preset
from bluelm_jax.params import LAYERS, flatten, param_shapes, path_name
from tests.sharding_data import CONFIG, NEW_TOKENS, greedy_ids, model_of, prompt_logits, prompts, random_params

MESHES = ["data=1,tensor=8", "data=2,tensor=4", "data=8,tensor=1"]


@pytest.fixture(scope="module")
def host_params():
    return random_params(CONFIG, seed=0)


@pytest.fixture(scope="module")
def reference(host_params):
    """Greedy ids and the prompts' logits on one device, no mesh."""
    model = model_of(jax.device_put(host_params, jax.devices()[0]))
    ids = greedy_ids(model, prompts(CONFIG))
    assert len({t for row in ids for t in row}) >= 10  # varied tokens: a sharding bug cannot hide behind a constant
    assert sum(map(len, ids)) > 4 * NEW_TOKENS  # most rows run on past the first tokens
    return ids, prompt_logits(model, prompts(CONFIG))


def test_eight_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"


def test_parse_and_make_mesh():
    assert sharding.parse_mesh("data=2,tensor=4") == {"data": 2, "tensor": 4}
    assert sharding.parse_mesh(" tensor = 8 ") == {"tensor": 8}
    mesh = sharding.make_mesh("data=2,tensor=4")
    assert dict(mesh.shape) == {"data": 2, "tensor": 4} and mesh.axis_names == ("data", "tensor")
    assert dict(sharding.make_mesh("data=-1,tensor=2").shape) == {"data": 4, "tensor": 2}
    assert dict(sharding.make_mesh("tensor=4,fsdp=2").shape) == {"fsdp": 2, "tensor": 4}  # canonical order
    for bad, why in [("data=3,tensor=4", "needs 12 devices, 8 present"), ("model=8", "unknown mesh axis"),
                     ("data=2,data=4", "given twice"), ("data=x", "bad mesh axis"), ("", "empty"),
                     ("data=-1,tensor=-1", "at most one"), ("data=3,tensor=-1", "not a multiple")]:
        with pytest.raises(sharding.MeshError, match=why):
            sharding.make_mesh(bad)


def test_a_smaller_mesh_uses_the_first_devices(capsys):
    mesh = sharding.make_mesh("data=1,tensor=4")
    assert dict(mesh.shape) == {"data": 1, "tensor": 4}
    assert list(mesh.devices.flat) == jax.devices()[:4]
    assert capsys.readouterr().err == "note: mesh data=1,tensor=4 uses the first 4 of the 8 devices\n"
    sharding.make_mesh("data=2,tensor=4")
    assert capsys.readouterr().err == ""  # all devices: nothing to say


def test_default_mesh():
    # the default: tensor parallel over as many devices as the KV heads allow, data over the rest
    assert dict(sharding.make_mesh(config=CONFIG).shape) == {"data": 2, "tensor": 4}
    assert dict(sharding.make_mesh(config=preset("bluelm-7b-chat")).shape) == {"data": 1, "tensor": 8}
    assert sharding.default_mesh_shape(8, preset("tiny")) == {"data": 4, "tensor": 2}


def _short_names(specs: dict) -> dict:
    """{"embed_tokens/embedding": spec, "layers/self_attn/q_proj/kernel": spec, ...}: every layer
    must have the same specs, listed once."""
    out: dict = {}
    for path, spec in flatten(specs):
        name = path_name(path[1:] if path[:2] == LAYERS else path).removeprefix("model/")
        if path[:2] == LAYERS:
            name = "layers/" + path_name(path[3:])
        assert out.setdefault(name, spec) == spec, path
    return out


def test_partition_spec_of_every_parameter():
    """Pins the rule for the 7B shapes on data=2,tensor=4 and on data=2,fsdp=2,tensor=2."""
    from flax import nnx

    from bluelm_jax.model import abstract_model

    config = preset("bluelm-7b-chat")
    expected = {
        "data=2,tensor=4": {
            "embed_tokens/embedding": P("tensor", None),
            "embed_layer_norm/bias": P(None), "embed_layer_norm/weight": P(None),
            "layers/input_layernorm/weight": P(None), "layers/post_attention_layernorm/weight": P(None),
            "layers/self_attn/q_proj/kernel": P(None, "tensor"), "layers/self_attn/k_proj/kernel": P(None, "tensor"),
            "layers/self_attn/v_proj/kernel": P(None, "tensor"), "layers/self_attn/o_proj/kernel": P("tensor", None),
            "layers/mlp/gate_proj/kernel": P(None, "tensor"), "layers/mlp/up_proj/kernel": P(None, "tensor"),
            "layers/mlp/down_proj/kernel": P("tensor", None),
            "norm/weight": P(None), "lm_head/kernel": P(None, "tensor"),
        },
        "data=2,fsdp=2,tensor=2": {
            "embed_tokens/embedding": P("tensor", "fsdp"),
            "embed_layer_norm/bias": P(None), "embed_layer_norm/weight": P(None),
            "layers/input_layernorm/weight": P(None), "layers/post_attention_layernorm/weight": P(None),
            "layers/self_attn/q_proj/kernel": P("fsdp", "tensor"), "layers/self_attn/k_proj/kernel": P("fsdp", "tensor"),
            "layers/self_attn/v_proj/kernel": P("fsdp", "tensor"), "layers/self_attn/o_proj/kernel": P("tensor", "fsdp"),
            "layers/mlp/gate_proj/kernel": P("fsdp", "tensor"), "layers/mlp/up_proj/kernel": P("fsdp", "tensor"),
            "layers/mlp/down_proj/kernel": P("tensor", "fsdp"),
            "norm/weight": P(None), "lm_head/kernel": P("fsdp", "tensor"),
        },
    }
    # the module's own metadata: nnx.get_partition_spec gives the logical axes, the rules the mesh axes
    logical = nnx.get_partition_spec(nnx.state(abstract_model(config))).to_pure_dict()
    for mesh_spec, specs in expected.items():
        mesh = sharding.make_mesh(mesh_spec)
        table = sharding.param_specs(config, mesh)
        assert len(list(flatten(table))) == 3 + 9 * 32 + 2
        assert _short_names(table) == specs, mesh_spec
        from_module = jax.tree.map(lambda p: sharding.logical_to_mesh(p, config, mesh), logical,
                                   is_leaf=lambda x: isinstance(x, P))
        assert dict(flatten(from_module)) == dict(flatten(table)), mesh_spec
    # the divisibility fallback: 4 KV heads cannot be split 8 ways, 8 query heads can
    mesh = sharding.make_mesh("tensor=8")
    layer_1 = (*LAYERS, 1, "self_attn")
    assert sharding.param_spec((*layer_1, "k_proj", "kernel"), CONFIG, mesh) == P(None, None)
    assert sharding.param_spec((*layer_1, "q_proj", "kernel"), CONFIG, mesh) == P(None, "tensor")
    cache_shape = (8, CONFIG.num_key_value_heads, 64, CONFIG.head_dim)  # one layer's
    assert sharding.activation_spec("kv_cache", cache_shape, mesh) == P(None, None, None, None)
    assert (sharding.activation_spec("kv_cache", (8, 32, 64, 128), sharding.make_mesh("data=2,tensor=4"))
            == P("data", "tensor", None, None))
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.param_spec((*layer_1, "qkv", "kernel"), config, mesh)


def expected_shard_shape(shape, spec, mesh):
    out = list(shape)
    for dim, axes in enumerate(spec):
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            out[dim] //= mesh.shape[axis]
    return tuple(out)


def check_each_device_holds_its_shard(params, mesh):
    """Every device holds exactly one shard of each leaf, of the size the spec implies."""
    split = 0
    for path, leaf in flatten(params):
        spec = sharding.param_spec(path, CONFIG, mesh)
        assert leaf.sharding.spec == spec and leaf.sharding.mesh == mesh, path
        want = expected_shard_shape(leaf.shape, spec, mesh)
        shards = leaf.addressable_shards
        assert len(shards) == len(mesh.devices.flat)
        assert {s.device for s in shards} == set(mesh.devices.flat)
        for s in shards:
            assert s.data.shape == want, (path, s.data.shape, want)
        split += want != leaf.shape
    return split


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_generation_equals_single_device(mesh_spec, host_params, reference):
    from bluelm_jax.generate import GenerationSettings, prefill
    from bluelm_jax.planning import make_plan

    mesh = sharding.make_mesh(mesh_spec)
    params = sharding.shard_params(host_params, CONFIG, mesh)
    split = check_each_device_holds_its_shard(params, mesh)
    # embedding and head, and per layer the 7 projections (tensor=8: not the 2 of the 4 KV heads)
    per_layer = 0 if mesh.shape["tensor"] == 1 else (7 if mesh.shape["tensor"] == 4 else 5)
    assert split == (0 if per_layer == 0 else 2 + per_layer * CONFIG.num_hidden_layers)
    model = model_of(params, mesh)
    ref_ids, ref_logits = reference
    assert greedy_ids(model, prompts(CONFIG)) == ref_ids
    np.testing.assert_allclose(prompt_logits(model, prompts(CONFIG)), ref_logits, atol=1e-4)
    # the KV cache of the library's prefill: rows on data, KV heads on tensor (when they divide)
    plan = make_plan(model, prompts(CONFIG), GenerationSettings(max_new_tokens=NEW_TOKENS))
    with sharding.use(mesh):
        cache = prefill(model, plan).cache
    for layer in cache.k + cache.v:
        spec = sharding.activation_spec("kv_cache", layer.shape, mesh)
        assert layer.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), layer.ndim)
        assert {s.data.shape for s in layer.addressable_shards} == {expected_shard_shape(layer.shape, spec, mesh)}


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path, host_params, reference):
    saved_on = sharding.make_mesh("data=2,tensor=4")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    checkpoint.save_params(directory / checkpoint.PARAMS_DIR, sharding.shard_params(host_params, CONFIG, saved_on))
    checkpoint.write_metadata(directory, "float32")
    (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(CONFIG.to_hf_dict()))
    for target in ("data=8,tensor=1", "data=1,tensor=8"):
        mesh = sharding.make_mesh(target)
        params = checkpoint.restore_params(directory, CONFIG, shardings=sharding.param_shardings(CONFIG, mesh))
        check_each_device_holds_its_shard(params, mesh)
        assert greedy_ids(model_of(params, mesh), prompts(CONFIG)) == reference[0]
    abstract = checkpoint.abstract_params(CONFIG, "float32", sharding.param_shardings(CONFIG, mesh))
    head = abstract["lm_head"]["kernel"]
    assert head.sharding.spec == P(None, "tensor") and head.shape == (256, 640)


def test_constrain_is_identity_without_a_mesh():
    x = np.ones((4, 3, 8), np.float32)
    assert sharding.constrain(x, "hidden") is x
    mesh = sharding.make_mesh("data=2,tensor=4")
    assert sharding.activation_spec("logits", (4, 1, 640), mesh) == P("data", None, "tensor")
    assert sharding.activation_spec("logits", (3, 1, 642), mesh) == P(None, None, None)
    lines = list(sharding.describe(sharding.shard_params(random_params(CONFIG), CONFIG, mesh)))
    assert len(lines) == len(list(flatten(param_shapes(CONFIG)))) and "shard (128, 256)" in " ".join(lines)


def test_load_onto_a_mesh_then_generate(hf_checkpoint, tmp_path):
    """HF dir -> converter -> load(dir, mesh=...): every device reads only its shards; sharded
    generation gives the single-device tokens."""
    import bluelm_jax
    from bluelm_jax.generate import generate
    from bluelm_jax.hf.to_orbax import convert_hf_to_flax

    out = tmp_path / "converted"
    convert_hf_to_flax(hf_checkpoint("tiny-gqa"), out, dtype="float32", progress=False)
    mesh = sharding.make_mesh("data=2,tensor=4")
    model = bluelm_jax.load(out, mesh=mesh)
    assert model.mesh is mesh
    q = model.module.model.layers[1].self_attn.q_proj.kernel
    assert q.sharding.spec == P(None, "tensor") and {s.data.shape for s in q.addressable_shards} == {(256, 64)}
    prompts = [[1, 45, 300, 17, 9], [1, 7, 77, 177, 277, 377, 400, 11]]
    with sharding.use(model.mesh):
        sharded = generate(model, prompts, max_new_tokens=12)
    single = generate(bluelm_jax.load(out), prompts, max_new_tokens=12)
    assert sharded.ids == single.ids and len({t for row in single.ids for t in row}) > 3


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_bfloat16_weight_layout_on_a_mesh(hf_checkpoint, tmp_path, source):
    """bfloat16 on CPU loads in the weight layout onto a mesh too: each projection [out, in] placed
    with its kernel's mesh axes swapped, from an Orbax dir and from a Hugging Face dir; sharded
    generation gives the single-device tokens."""
    import bluelm_jax
    from bluelm_jax.generate import generate
    from bluelm_jax.hf.to_orbax import convert_hf_to_flax

    path = hf_checkpoint("tiny-gqa")
    if source == "orbax":
        path = tmp_path / "converted"
        convert_hf_to_flax(hf_checkpoint("tiny-gqa"), path, dtype="bfloat16", progress=False)
    mesh = sharding.make_mesh("data=2,tensor=4")
    model = bluelm_jax.load(path, mesh=mesh, dtype="bfloat16")
    assert model.layout == "weight"
    attention = model.module.model.layers[1].self_attn
    assert attention.q_proj.weight.sharding.spec == P("tensor", None)
    assert {s.data.shape for s in attention.q_proj.weight.addressable_shards} == {(64, 256)}
    assert attention.o_proj.weight.sharding.spec == P(None, "tensor")
    prompts = [[1, 45, 300, 17, 9], [1, 7, 77, 177, 277, 377, 400, 11]]
    with sharding.use(model.mesh):
        sharded = generate(model, prompts, max_new_tokens=12)
    single = generate(bluelm_jax.load(path, dtype="bfloat16"), prompts, max_new_tokens=12)
    assert sharded.ids == single.ids and len({t for row in single.ids for t in row}) > 3
