"""GPTQ/AWQ checkpoints into the project's int4 leaves: exact against the known integers, act_order
falling back to dequantized kernels, and one clear line for every checkpoint it cannot read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bluelm_jax import packed_int4 as p4
from bluelm_jax import quantize
from bluelm_jax.config import preset
from bluelm_jax.hf.quantized import read_quantization, read_quantized_leaves
from bluelm_jax.hf.to_orbax import ConversionError
from bluelm_jax.params import KERNEL, WEIGHT, hf_tensors
from tests.quantized_checkpoints import known_layer, packed_tensors, write_quantized_checkpoint

CONFIG = preset("tiny")  # hidden 256, intermediate 512: two and four groups of 128 inputs
GPTQ = p4.QuantizationConfig("gptq", 4, 128, desc_act=False, zero_point=True, version="gptq")
AWQ = p4.QuantizationConfig("awq", 4, 128, desc_act=False, zero_point=True, version="gemm")


def unpacked(leaves: dict) -> np.ndarray:
    """The signed levels [out, in] of int4 leaves."""
    group = 2 * leaves["qvalue"].shape[1] // leaves["scale"].shape[0]
    return np.asarray(quantize.unpack_int4(leaves["qvalue"], in_axis=1, group=group))


def int4_weight(leaves: dict) -> np.ndarray:
    """float32 [in, out] = q * scale + offset, by group, from int4 leaves."""
    q = unpacked(leaves).T.astype(np.float32)  # [in, out]
    rows = q.shape[0] // leaves["scale"].shape[0]
    scale = np.repeat(leaves["scale"], rows, axis=0)  # [in, out]
    offset = np.repeat(leaves.get("offset", np.zeros_like(leaves["scale"])), rows, axis=0)
    return q * scale + offset


def assert_int4_leaves_match(leaves: dict, layer) -> None:
    """Integers exactly, scales and offsets from the known values, and the weight exactly."""
    assert leaves["qvalue"].dtype == np.int8 and leaves["qvalue"].shape == (layer.q.shape[1], layer.q.shape[0] // 2)
    np.testing.assert_array_equal(unpacked(leaves), layer.q.T.astype(np.int8) - 8)
    np.testing.assert_array_equal(leaves["scale"], layer.scales.astype(np.float32))
    if "offset" in leaves:
        expected_offset = layer.scales.astype(np.float32) * (8 - layer.zeros).astype(np.float32)
        np.testing.assert_array_equal(leaves["offset"], expected_offset)
    np.testing.assert_array_equal(int4_weight(leaves), layer.dequantized())


# ------------------------------------------------------------------ one layer


@pytest.mark.parametrize("quantization", [GPTQ, p4.QuantizationConfig("gptq", 4, 128, False, True, "gptq_v2"), AWQ],
                         ids=["gptq", "gptq_v2", "awq"])
def test_one_layer_becomes_int4_leaves_exactly(quantization):
    low = 1 if quantization.version == "gptq" else 0
    layer = known_layer(np.random.default_rng(1), 256, 48, 128, zero_low=low)
    layer.zeros[0, :2] = (low, low + 15)  # both ends of the zero points' range
    layer.q[:2, 0] = (0, 15)
    tensors = packed_tensors(layer, quantization.method, quantization.gptq_zero_offset if low else 0)
    leaves = p4.project_int4_leaves(quantization, tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                    tensors.get("g_idx"))
    assert set(leaves) == {"qvalue", "scale", "offset"}
    assert_int4_leaves_match(leaves, layer)
    # the format's own dequantization, the same float32 values
    np.testing.assert_array_equal(int4_weight(leaves), p4.dequantize_linear(quantization, *tensors.values()))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_levels_unpack_straight_into_out_in(method):
    layer = known_layer(np.random.default_rng(5), 64, 24, 32, zero_low=int(method == "gptq"))
    qweight = packed_tensors(layer, method)["qweight"]
    unpack = p4.unpack_gptq_qweight_out_in if method == "gptq" else p4.unpack_awq_qweight_out_in
    levels = unpack(qweight)
    assert levels.dtype == np.uint8 and levels.flags.c_contiguous
    np.testing.assert_array_equal(levels, layer.q.T)


def test_symmetric_gptq_has_no_offset_and_rejects_other_zero_points():
    sym = p4.QuantizationConfig("gptq", 4, 128, desc_act=False, zero_point=False, version="gptq")
    layer = known_layer(np.random.default_rng(2), 256, 16, 128, sym=True)
    tensors = packed_tensors(layer, "gptq")
    leaves = p4.project_int4_leaves(sym, *tensors.values())
    assert set(leaves) == {"qvalue", "scale"}
    assert_int4_leaves_match(leaves, layer)
    skewed = packed_tensors(known_layer(np.random.default_rng(2), 256, 16, 128, zero_low=1), "gptq")
    with pytest.raises(ValueError, match="symmetric checkpoint .* zero point 8 everywhere"):
        p4.project_int4_leaves(sym, *skewed.values())


def test_act_order_layer_has_no_int4_form():
    layer = known_layer(np.random.default_rng(3), 256, 16, 128, act_order=True, zero_low=1)
    assert not np.array_equal(layer.g_idx, p4.default_g_idx(256, 128))
    assert p4.project_int4_leaves(GPTQ, *packed_tensors(layer, "gptq").values()) is None


def test_one_group_over_all_rows():
    whole = p4.QuantizationConfig("awq", 4, -1, desc_act=False, zero_point=True, version="gemm")
    layer = known_layer(np.random.default_rng(4), 64, 16, -1)
    leaves = p4.project_int4_leaves(whole, *packed_tensors(layer, "awq").values())
    assert leaves["scale"].shape == (1, 16)
    assert_int4_leaves_match(leaves, layer)


# ------------------------------------------------------------------ whole checkpoints


def float_leaf(t, floats: dict) -> np.ndarray:
    w = floats[t.hf_name].astype(np.float32)
    return w.T if t.transpose else w


@pytest.mark.parametrize("method, fmt, num_shards", [("gptq", "safetensors", 2), ("awq", "bin", 1)])
def test_checkpoint_reads_back_as_int4_leaves(tmp_path, method, fmt, num_shards):
    known = write_quantized_checkpoint(str(tmp_path / method), CONFIG, method, fmt=fmt, num_shards=num_shards)
    leaves = dict(read_quantized_leaves(known.directory, CONFIG))
    expected_paths = set()
    for t in hf_tensors(CONFIG):
        module = t.hf_name[: -len(".weight")]
        if module in known.layers:
            found = {name: leaves[(*t.path[:-1], name)] for name in ("qvalue", "scale", "offset")}
            assert_int4_leaves_match(found, known.layers[module])
            expected_paths |= {(*t.path[:-1], name) for name in found}
        else:
            assert leaves[t.path].dtype == np.float32  # float16 as stored becomes float32
            np.testing.assert_array_equal(leaves[t.path], float_leaf(t, known.floats))
            expected_paths.add(t.path)
    assert len(known.layers) == 7 * CONFIG.num_hidden_layers  # lm_head stays float, as in the releases
    assert set(leaves) == expected_paths


@pytest.mark.parametrize("layout", [KERNEL, WEIGHT])
def test_act_order_projections_are_dequantized(tmp_path, layout):
    known = write_quantized_checkpoint(str(tmp_path / "gptq"), CONFIG, "gptq", desc_act=True)
    leaves = dict(read_quantized_leaves(known.directory, CONFIG, layout=layout, dtype="float32"))
    for t in hf_tensors(CONFIG, layout):
        module = t.hf_name[: -len(".weight")]
        if module in known.layers:
            assert (*t.path[:-1], "qvalue") not in leaves
            weight = known.layers[module].dequantized()  # [in, out]
            np.testing.assert_array_equal(leaves[t.path], weight if layout == KERNEL else weight.T)


def test_dequantize_on_request_in_bfloat16(tmp_path):
    known = write_quantized_checkpoint(str(tmp_path / "awq"), CONFIG, "awq", quantize_lm_head=True)
    leaves = dict(read_quantized_leaves(known.directory, CONFIG, dequantize=True, dtype="bfloat16"))
    assert "model.layers.1.mlp.down_proj" in known.layers and "lm_head" in known.layers
    assert not any(path[-1] in ("qvalue", "scale", "offset") for path in leaves)
    for t in hf_tensors(CONFIG):
        module = t.hf_name[: -len(".weight")]
        assert leaves[t.path].dtype.name == "bfloat16"
        if module in known.layers:
            expected = known.layers[module].dequantized()
            np.testing.assert_array_equal(leaves[t.path], expected.astype(leaves[t.path].dtype))


def test_quantize_config_json_when_config_json_has_none(tmp_path):
    known = write_quantized_checkpoint(str(tmp_path / "gptq"), CONFIG, "gptq", sym=True)
    config_file = os.path.join(known.directory, "config.json")
    with open(config_file) as f:
        raw = json.load(f)
    quantization = raw.pop("quantization_config")
    quantization.pop("quant_method")  # AutoGPTQ's quantize_config.json may not name the method
    with open(config_file, "w") as f:
        json.dump(raw, f)
    with open(os.path.join(known.directory, "quantize_config.json"), "w") as f:
        json.dump(quantization, f)
    assert read_quantization(known.directory) == p4.QuantizationConfig("gptq", 4, 128, False, False, "gptq")
    leaves = dict(read_quantized_leaves(known.directory, CONFIG))
    q_proj = {name: leaves[("model", "layers", 0, "self_attn", "q_proj", name)] for name in ("qvalue", "scale")}
    assert ("model", "layers", 0, "self_attn", "q_proj", "offset") not in leaves
    assert_int4_leaves_match(q_proj, known.layers["model.layers.0.self_attn.q_proj"])


def test_gptq_without_g_idx_groups_rows_in_order(tmp_path):
    known = write_quantized_checkpoint(str(tmp_path / "gptq"), CONFIG, "gptq")
    _replace_tensor("model.layers.1.mlp.up_proj.g_idx", None)(known.directory)
    leaves = dict(read_quantized_leaves(known.directory, CONFIG))
    up_proj = {name: leaves[("model", "layers", 1, "mlp", "up_proj", name)] for name in ("qvalue", "scale", "offset")}
    assert_int4_leaves_match(up_proj, known.layers["model.layers.1.mlp.up_proj"])


# ------------------------------------------------------------------ what it cannot read


def _edit_quantization(**changes):
    def edit(directory):
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            raw = json.load(f)
        raw["quantization_config"].update(changes)
        with open(path, "w") as f:
            json.dump(raw, f)
    return edit


def _without_quantization(directory):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        raw = json.load(f)
    del raw["quantization_config"]
    with open(path, "w") as f:
        json.dump(raw, f)


def _replace_tensor(name, value):
    def edit(directory):
        from safetensors.numpy import load_file, save_file

        path = os.path.join(directory, "model.safetensors")
        tensors = load_file(path)
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
        save_file(tensors, path)
    return edit


@pytest.mark.parametrize("method, edit, message", [
    ("gptq", _edit_quantization(bits=8), r"config\.json: quantization_config\.bits=8 is not supported \(only 4\)"),
    ("gptq", _edit_quantization(checkpoint_format="marlin"), r"config\.json: quantization_config\.checkpoint_format="
                                                             r"'marlin' is not supported"),
    ("gptq", _edit_quantization(is_marlin_format=True), r"checkpoint_format='marlin' is not supported"),
    ("awq", _edit_quantization(version="exllama"), r"config\.json: quantization_config\.version='exllama' is not "
                                                   r"supported \(supported: gemm\)"),
    ("awq", _edit_quantization(version="gemv_fast"), r"quantization_config\.version='gemv_fast'"),
    ("gptq", _edit_quantization(quant_method="bitsandbytes"), r"quantization_config\.quant_method='bitsandbytes'"),
    ("gptq", _without_quantization, r"config\.json: no quantization_config \(not a GPTQ or AWQ checkpoint\)"),
    ("gptq", _replace_tensor("model.layers.1.mlp.up_proj.qzeros", None),
     r"1 tensor\(s\) missing: model\.layers\.1\.mlp\.up_proj\.qzeros"),
    ("gptq", _replace_tensor("model.layers.0.self_attn.o_proj.qzeros", np.zeros((2, 8), np.int32)),
     r"model\.safetensors: tensor model\.layers\.0\.self_attn\.o_proj\.qzeros has shape \[2, 8\], expected \[2, 32\]"),
    ("awq", _replace_tensor("model.layers.0.mlp.gate_proj.qweight", np.zeros((256, 64), np.float32)),
     r"tensor model\.layers\.0\.mlp\.gate_proj\.qweight has dtype float32, expected int32"),
    ("awq", _replace_tensor("model.layers.0.mlp.gate_proj.g_idx", np.zeros(256, np.int32)),
     r"1 unexpected tensor\(s\): model\.layers\.0\.mlp\.gate_proj\.g_idx"),
])
def test_bad_checkpoints_give_one_line(tmp_path, method, edit, message):
    known = write_quantized_checkpoint(str(tmp_path / method), CONFIG, method)
    edit(known.directory)
    with pytest.raises(ConversionError, match=message) as error:
        next(read_quantized_leaves(known.directory, CONFIG))
    assert "\n" not in str(error.value)


def test_symmetric_checkpoint_with_other_zero_points_names_the_projection(tmp_path):
    known = write_quantized_checkpoint(str(tmp_path / "gptq"), CONFIG, "gptq")  # asymmetric zero points
    _edit_quantization(sym=True)(known.directory)
    with pytest.raises(ConversionError, match=r"model\.safetensors: model\.layers\.\d\.\w+\.\w+_proj: GPTQ: a "
                                              r"symmetric checkpoint"):
        list(read_quantized_leaves(known.directory, CONFIG))
