"""Packed 4-bit (GPTQ / AWQ) Hugging Face checkpoints -> the project's parameter leaves, streamed.

    quantization = read_quantization(hf_dir)     # packed_int4.QuantizationConfig, or None (float checkpoint)
    for path, array in read_quantized_leaves(hf_dir, config):
        ...                                      # e.g. set_path(tree, path, array)

A quantized projection `<module>` of the checkpoint (`<module>.qweight`, `.qzeros`, `.scales`
and, for GPTQ, `.g_idx`, which older writers leave out: rows grouped as i // group_size;
packed_int4.py describes the layouts) becomes the leaves of the
project's int4 format, always [out, in] whatever `layout`:

    (..., "q_proj", "qvalue")   int8 [out, in/2]       (quantize.pack_int4 layout, signed nibbles)
    (..., "q_proj", "scale")    float32 [groups, out]
    (..., "q_proj", "offset")   float32 [groups, out]  (absent for a symmetric GPTQ checkpoint)

with w[o, i] = q[o, i] * scale[i // group, o] + offset[i // group, o] equal to the checkpoint's own
dequantization. A GPTQ act_order projection (g_idx other than i // group_size) has no such form:
it is dequantized instead and yields its float leaf, `(..., "q_proj", "kernel")` [in, out] (or
`"weight"` [out, in] in the WEIGHT layout); `dequantize=True` does that for every projection.
The caller tells the two apart by the last name of the path. Everything the checkpoint stores
in floating point (embeddings, norms, lm_head, any projection left unquantized) yields its leaf
as `load_hf_params` reads it, cast to `dtype` (default: bfloat16 or float32 as stored, float16
becoming float32).

Tensors are read one at a time in file order (reader.py; safetensors tensors are memory maps),
and a projection is converted and yielded as soon as its last part has been read, so memory
holds one projection's converted leaves at a time, never the model. Every name, shape and dtype
is checked before the first leaf is yielded; problems raise ConversionError, one line naming the
file and the tensor.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import checkpoint
from bluelm_jax import quantize as Q
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.jsonfile import read_json
from bluelm_jax.packed_int4 import (NIBBLES_PER_WORD, QuantizationConfig, dequantize_linear, project_int4_leaves,
                                    read_quantization_config)
from bluelm_jax.params import (KERNEL, OFFSET, PROJECTIONS, SCALE, WEIGHT, HFTensor, PathT,
                               Quantization, check_layout, hf_tensors)
from bluelm_jax.hf.reader import HFCheckpoint
from bluelm_jax.hf.tensors import ConversionError, check_names, resolve_dtype, to_layout

QUANTIZE_CONFIG_FILE = "quantize_config.json"  # AutoGPTQ's own copy of the GPTQ settings
PACKED_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
OPTIONAL_PARTS = ("g_idx",)  # a GPTQ checkpoint without g_idx (older writers) groups rows as i // group_size
# the dtypes of what a packed checkpoint stores in floating point (embeddings, norms, scales)
STORED_FLOAT_DTYPES = ("float16", "bfloat16", "float32")
PART_DTYPES = {"qweight": ("int32",), "qzeros": ("int32",), "scales": STORED_FLOAT_DTYPES, "g_idx": ("int32", "int64")}


# ------------------------------------------------------------------ quantization_config


def read_quantization(hf_dir: Union[str, os.PathLike]) -> Optional[QuantizationConfig]:
    """The packed-int4 settings of a checkpoint directory, or None for a float checkpoint.

    Read from config.json's `quantization_config`; when that is absent, from AutoGPTQ's
    quantize_config.json (a GPTQ checkpoint; its `quant_method` defaults to "gptq"). Anything
    packed_int4 cannot read raises ConversionError naming the file, the field and its value.
    """
    config_file = os.path.join(os.fspath(hf_dir), checkpoint.CONFIG_FILE)
    raw = _read_json(config_file)
    quantize_file = os.path.join(os.fspath(hf_dir), QUANTIZE_CONFIG_FILE)
    if "quantization_config" not in raw and os.path.isfile(quantize_file):
        config_file, raw = quantize_file, {"quantization_config": {"quant_method": "gptq", **_read_json(quantize_file)}}
    try:
        return read_quantization_config(raw)
    except ValueError as e:
        raise ConversionError(f"{config_file}: {e}") from None


def _read_json(path: str) -> dict:
    raw = read_json(path, ConversionError)
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return raw


# ------------------------------------------------------------------ the plan: what each tensor becomes


@dataclasses.dataclass(frozen=True)
class PackedProjection:
    """One quantized projection of the checkpoint: its HF module name and its float leaf."""

    module: str  # "model.layers.3.self_attn.q_proj"
    leaf: HFTensor  # the float tensor it replaces (hf_shape [out, in], path in the chosen layout)
    parts: tuple[str, ...]  # its packed tensors in this checkpoint (qweight, qzeros, scales[, g_idx])

    @property
    def in_out(self) -> tuple[int, int]:
        out_features, in_features = self.leaf.hf_shape
        return in_features, out_features

    def part_name(self, part: str) -> str:
        return f"{self.module}.{part}"

    def int4_path(self, leaf_name: str) -> PathT:
        """(..., "q_proj", leaf_name): a leaf of the int4 format, beside the float leaf's place."""
        return (*self.leaf.path[:-1], leaf_name)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every tensor to read: float tensors by name, and the packed projections by module name."""

    floats: dict[str, HFTensor]
    projections: dict[str, PackedProjection]

    def names(self) -> set[str]:
        return set(self.floats) | {p.part_name(part) for p in self.projections.values() for part in p.parts}


def plan_tensors(ckpt: HFCheckpoint, config: BlueLMConfig, quantization: QuantizationConfig,
                 layout: str = KERNEL) -> Plan:
    """What every tensor of `ckpt` becomes; raises ConversionError on missing, unexpected,
    mis-shaped or mis-typed tensors. A projection is packed when `<module>.qweight` is present."""
    floats, projections = {}, {}
    for t in hf_tensors(config, check_layout(layout)):
        module = t.hf_name[: -len(".weight")]
        if t.path[-2] in PROJECTIONS and f"{module}.qweight" in ckpt.entries:
            parts = tuple(part for part in PACKED_PARTS[quantization.method]
                          if part not in OPTIONAL_PARTS or f"{module}.{part}" in ckpt.entries)
            projections[module] = PackedProjection(module, t, parts)
        else:
            floats[t.hf_name] = t
    plan = Plan(floats, projections)
    check_names(ckpt, sorted(plan.names()))
    for name, t in floats.items():
        _check_entry(ckpt, name, t.hf_shape, STORED_FLOAT_DTYPES)
    for p in projections.values():
        shapes = packed_shapes(quantization, *p.in_out)
        for part in p.parts:
            _check_entry(ckpt, p.part_name(part), shapes[part], PART_DTYPES[part])
    return plan


def packed_shapes(quantization: QuantizationConfig, in_features: int, out_features: int) -> dict[str, tuple]:
    """The shape of each packed tensor of a [in, out] projection, by part name."""
    group = in_features if quantization.group_size == -1 else quantization.group_size
    groups = -(-in_features // group)
    words = lambda n: n // NIBBLES_PER_WORD  # noqa: E731
    shapes = {"qzeros": (groups, words(out_features)), "scales": (groups, out_features)}
    if quantization.method == "gptq":
        return {"qweight": (words(in_features), out_features), **shapes, "g_idx": (in_features,)}
    return {"qweight": (in_features, words(out_features)), **shapes}


def _check_entry(ckpt: HFCheckpoint, name: str, shape: tuple, dtypes: tuple[str, ...]) -> None:
    entry = ckpt.entries[name]
    if entry.shape != tuple(shape):
        raise ConversionError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, expected {list(shape)} "
                              "(from config.json)")
    if entry.dtype.name not in dtypes:
        raise ConversionError(f"{entry.file}: tensor {name} has dtype {entry.dtype.name}, expected "
                              f"{' or '.join(dtypes)}")


# ------------------------------------------------------------------ reading


def read_quantized_leaves(source: Union[str, os.PathLike, HFCheckpoint], config: BlueLMConfig, *,
                          dequantize: bool = False, dtype: Optional[str] = None,
                          layout: str = KERNEL) -> Iterator[tuple[PathT, np.ndarray]]:
    """Yields (leaf path, numpy array) for every leaf of a GPTQ/AWQ checkpoint (module docstring).

    source: a checkpoint directory or an HFCheckpoint of one. dequantize: float leaves for every
    projection instead of int4 leaves. dtype: of the float leaves ("bfloat16", "float32"; default
    as stored). layout: of the float projection leaves (KERNEL [in, out] or WEIGHT [out, in]).
    """
    ckpt = source if isinstance(source, HFCheckpoint) else HFCheckpoint(source)
    quantization = read_quantization(ckpt.directory)
    if quantization is None:
        raise ConversionError(f"{os.path.join(ckpt.directory, checkpoint.CONFIG_FILE)}: no quantization_config "
                              "(not a GPTQ or AWQ checkpoint)")
    plan = plan_tensors(ckpt, config, quantization, layout)
    float_dtype = np.dtype(jnp.dtype(resolve_dtype(dtype, ckpt)))
    pending: dict[str, dict[str, np.ndarray]] = {}  # parts read so far, by module
    for name, src in ckpt.tensors(plan.names()):
        if name in plan.floats:
            t = plan.floats[name]
            yield t.path, to_layout(src, t.transpose, float_dtype)
            continue
        module, part = name.rsplit(".", 1)
        parts = pending.setdefault(module, {})
        parts[part] = src
        if len(parts) == len(plan.projections[module].parts):
            del pending[module]
            yield from projection_leaves(plan.projections[module], quantization, parts, dequantize, float_dtype,
                                         ckpt.entries[name].file)


def projection_leaves(projection: PackedProjection, quantization: QuantizationConfig, parts: dict[str, np.ndarray],
                      dequantize: bool, float_dtype: np.dtype, where: str) -> Iterator[tuple[PathT, np.ndarray]]:
    """The leaves of one packed projection: its int4 leaves, or its float leaf when `dequantize`
    or when it has no int4 form (act_order). `where` (a file) prefixes any error."""
    packed = (parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"))
    try:
        leaves = None if dequantize else project_int4_leaves(quantization, *packed)
        if leaves is None:
            weight = dequantize_linear(quantization, *packed, out_in=projection.leaf.path[-1] == WEIGHT)
    except ValueError as e:
        raise ConversionError(f"{where}: {projection.module}: {e}") from None
    if leaves is None:
        yield projection.leaf.path, weight.astype(float_dtype, copy=False)
    else:
        yield from ((projection.int4_path(leaf_name), value) for leaf_name, value in leaves.items())


# ------------------------------------------------------------------ the whole int4 tree


def int4_quantization(ckpt: HFCheckpoint, quantization: QuantizationConfig) -> Quantization:
    """The project's quantization (params.Quantization) of a GPTQ/AWQ checkpoint's int4 tree:
    its group size, lm_head when the checkpoint packs it, offsets when it has zero points."""
    if quantization.group_size == -1:
        raise ConversionError(f"{ckpt.directory}: group_size -1 (one group per projection) has no int4 form here "
                              "(groups must have one size for every projection); load it dequantized")
    return Quantization("int4", quantization.group_size, lm_head="lm_head.qweight" in ckpt.entries,
                        offsets=quantization.zero_point)


def int4_tree_leaves(ckpt: HFCheckpoint, config: BlueLMConfig, tree: Quantization, dtype: Optional[str] = None,
                     layout: str = KERNEL) -> Iterator[tuple[PathT, np.ndarray]]:
    """`read_quantized_leaves`, with every projection `tree` covers in the int4 format: a projection
    the checkpoint stores in floating point or that has no int4 form (act_order) is quantized with
    the project's own symmetric int4 (quantize.quantize_projection), with zero offsets when the
    tree has offsets. So every leaf is one of `params.leaves(config, layout, tree)`."""
    own = Quantization("int4", tree.group)
    for path, array in read_quantized_leaves(ckpt, config, dtype=dtype, layout=layout):
        if path[-1] not in (KERNEL, WEIGHT) or not tree.covers(path):
            yield path, array
            continue
        with jax.default_device(jax.devices("cpu")[0]):
            leaves = {name: np.asarray(value) for name, value in
                      Q.quantize_projection(array, 0 if path[-1] == KERNEL else 1, own).items()}
        if tree.offsets:
            leaves[OFFSET] = np.zeros_like(leaves[SCALE])
        for name, value in leaves.items():
            yield (*path[:-1], name), value
