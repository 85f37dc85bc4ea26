"""Tiny GPTQ and AWQ checkpoints in Hugging Face layout, built from known integers, for the tests.

    layers = write_quantized_checkpoint(directory, preset("tiny"), "gptq", tokenizer_model=...)

writes config.json (with `quantization_config` as the releases write it), the tensors (every
projection packed from random levels, zero points and float16 scales; embeddings, norms and
lm_head in float16, as the releases store them) and optionally tokenizer.model. It returns the
known values: `layers` maps each packed module name to its `KnownLayer`, whose `dequantized()`
is the format's weight computed here, straight from the integers, and `floats` the float tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import numpy as np

from bluelm_jax import packed_int4 as p4
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.params import PROJECTIONS, hf_tensors
from tests.hf_reference import random_hf_weights


@dataclasses.dataclass(frozen=True)
class KnownLayer:
    """The integers and scales one packed projection was built from."""

    q: np.ndarray  # [in, out] levels 0..15
    zeros: np.ndarray  # [groups, out] zero points themselves (not as stored)
    scales: np.ndarray  # [groups, out] float16
    g_idx: np.ndarray  # [in] int32 group of each input row

    def dequantized(self) -> np.ndarray:
        """float32 [in, out]: (q - zero[g_idx[i]]) * scale[g_idx[i]]."""
        zeros = self.zeros[self.g_idx].astype(np.float32)  # [in, out]
        return (self.q.astype(np.float32) - zeros) * self.scales[self.g_idx].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    directory: str
    layers: dict[str, KnownLayer]  # by module name, "model.layers.0.self_attn.q_proj"
    floats: dict[str, np.ndarray]  # the float tensors as stored (float16), by name


def quantization_config(method: str, group_size: int = 128, desc_act: bool = False, sym: bool = False,
                        checkpoint_format: Optional[str] = None) -> dict:
    """`quantization_config` as the releases write it (AutoGPTQ/optimum for GPTQ, AutoAWQ for AWQ)."""
    if method == "awq":
        return {"bits": 4, "group_size": group_size, "modules_to_not_convert": None, "quant_method": "awq",
                "version": "gemm", "zero_point": True}
    fields = {"bits": 4, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act, "sym": sym,
              "true_sequential": True, "quant_method": "gptq"}
    if checkpoint_format is not None:
        fields["checkpoint_format"] = checkpoint_format
    return fields


def known_layer(rng: np.random.Generator, in_features: int, out_features: int, group_size: int,
                act_order: bool = False, sym: bool = False, zero_low: int = 0) -> KnownLayer:
    """Random levels, zero points in zero_low..zero_low+15 (8 everywhere if sym), float16 scales,
    and g_idx i // group_size, or, with act_order, groups over a random permutation of the rows."""
    group = in_features if group_size == -1 else group_size
    groups = in_features // group
    q = rng.integers(0, 16, (in_features, out_features)).astype(np.uint8)
    zeros = np.full((groups, out_features), 8) if sym else rng.integers(zero_low, zero_low + 16, (groups, out_features))
    scales = rng.uniform(1e-3, 2e-2, (groups, out_features)).astype(np.float16)
    g_idx = p4.default_g_idx(in_features, group)
    if act_order:
        order = rng.permutation(in_features)
        g_idx = np.empty(in_features, np.int32)
        g_idx[order] = np.arange(in_features) // group
    return KnownLayer(q, zeros.astype(np.int32), scales, g_idx)


def packed_tensors(layer: KnownLayer, method: str, zero_offset: int = 1) -> dict[str, np.ndarray]:
    """The stored tensors of one layer, by part name (qweight, qzeros, scales, and g_idx for GPTQ)."""
    if method == "awq":
        return {"qweight": p4.pack_awq_qweight(layer.q), "qzeros": p4.pack_awq_qzeros(layer.zeros),
                "scales": layer.scales}
    return {"qweight": p4.pack_gptq_qweight(layer.q), "qzeros": p4.pack_gptq_qzeros(layer.zeros, zero_offset),
            "scales": layer.scales, "g_idx": layer.g_idx.astype(np.int32)}


def write_quantized_checkpoint(directory: str, config: BlueLMConfig, method: str = "gptq", *,
                               group_size: int = 128, desc_act: bool = False, sym: bool = False,
                               checkpoint_format: Optional[str] = None, quantize_lm_head: bool = False,
                               tokenizer_model: Optional[str] = None, fmt: str = "safetensors",
                               num_shards: int = 1, seed: int = 0) -> QuantizedCheckpoint:
    """Writes a GPTQ or AWQ checkpoint of `config` (module docstring); fmt "safetensors" or "bin".

    desc_act writes act_order g_idx (GPTQ). num_shards 2 splits the sorted tensor names in
    two files with an index, so that some projection's parts lie in different files.
    """
    os.makedirs(directory, exist_ok=True)
    quantization = quantization_config(method, group_size, desc_act, sym, checkpoint_format)
    hf_config = {**config.to_hf_dict(), "torch_dtype": "float16", "quantization_config": quantization}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, os.path.join(directory, "tokenizer.model"))

    zero_offset = p4.GPTQ_ZERO_OFFSETS[checkpoint_format or "gptq"] if method == "gptq" else 0
    rng = np.random.default_rng(seed)
    floats = {n: w.astype(np.float16) for n, w in random_hf_weights(config, seed).items()}
    layers, tensors = {}, {}
    for t in hf_tensors(config):
        module = t.hf_name[: -len(".weight")]
        if t.path[-2] not in PROJECTIONS or (t.path[0] == "lm_head" and not quantize_lm_head):
            tensors[t.hf_name] = floats[t.hf_name]
            continue
        del floats[t.hf_name]
        out_features, in_features = t.hf_shape
        layer = known_layer(rng, in_features, out_features, group_size, act_order=desc_act, sym=sym,
                            zero_low=zero_offset)
        layers[module] = layer
        tensors.update({f"{module}.{part}": v for part, v in packed_tensors(layer, method, zero_offset).items()})
    _save(directory, tensors, fmt, num_shards)
    return QuantizedCheckpoint(directory, layers, floats)


def _save(directory: str, tensors: dict[str, np.ndarray], fmt: str, num_shards: int) -> None:
    names = sorted(tensors)
    half = -(-len(names) // num_shards)
    groups = [names[i:i + half] for i in range(0, len(names), half)]
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown format {fmt!r}")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    single, pattern, index = f"{stem}.{fmt}", f"{stem}-{{:05d}}-of-{{:05d}}.{fmt}", f"{stem}.{fmt}.index.json"
    weight_map = {}
    for i, group in enumerate(groups):
        filename = single if len(groups) == 1 else pattern.format(i + 1, len(groups))
        _save_file({n: np.ascontiguousarray(tensors[n]) for n in group}, os.path.join(directory, filename), fmt)
        weight_map.update({n: filename for n in group})
    if len(groups) > 1:
        with open(os.path.join(directory, index), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def _save_file(tensors: dict[str, np.ndarray], path: str, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, path, metadata={"format": "pt"})
    else:
        import torch

        torch.save({n: torch.from_numpy(a) for n, a in tensors.items()}, path)
