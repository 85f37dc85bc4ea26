"""A bluelm-jax parameter tree or converted directory -> a Hugging Face directory.

    export_checkpoint(ckpt_dir, out_dir, adapter_dir=None)   # the command line: bluelm-export (hf/cli.py)
    export_params(out_dir, params, config, tokenizer_model, "float32")   # an in-memory tree

Writes config.json (the checkpoint's, with torch_dtype set), the weights as safetensors in
PyTorch layout (one model.safetensors, or shards model-0000i-of-0000N.safetensors with
model.safetensors.index.json when larger than `max_shard_bytes`) and tokenizer.model. The
names, shapes and transposes come from params.hf_tensors, the same table the importer
(to_orbax.py) uses, so HF -> Orbax -> HF gives back identical tensors. An adapter
directory (from LoRA fine-tuning) is merged into the weights first.

Tensors are converted and written one at a time. The output goes to a temporary directory
beside `out_dir` and is renamed into place at the end; on any error it is removed.
`out_dir` may not be, contain or lie inside the checkpoint or the adapter directory (so
that `force` never deletes an input).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Optional

import ml_dtypes
import numpy as np

from bluelm_jax.atomic_dir import atomic_directory, refuse_existing, refuse_overlap
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.params import HFTensor, get_path, hf_tensors, path_name

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
SAFETENSORS_TAGS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
EXPORT_DTYPES = tuple(SAFETENSORS_TAGS)


class ExportError(ValueError):
    """Bad input to the exporter; the message is one line."""


def parse_size(text: str) -> int:
    """Bytes of "5GB", "500MB", "2GiB", "1000" ...; ExportError if unreadable."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"cannot read size {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
             "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ExportError(f"size {text!r} must be positive")
    return size


def hf_arrays(params: dict, config: BlueLMConfig, dtype: str) -> Iterator[tuple[HFTensor, np.ndarray]]:
    """(tensor, array in PyTorch layout and `dtype`) for every tensor of the checkpoint, one at a time."""
    from bluelm_jax.checkpoint import host_transpose  # imported with jax, once the arguments are read

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    for t in hf_tensors(config):
        leaf = get_path(params, t.path)
        a = np.asarray(leaf)
        if a.dtype != np_dtype:
            a = a.astype(np_dtype)
        a = host_transpose(a) if t.transpose else np.ascontiguousarray(a)
        if a.shape != t.hf_shape:
            raise ExportError(f"parameter {path_name(t.path)} gives {t.hf_name} shape {a.shape}, expected {t.hf_shape}")
        yield t, a


def plan_shards(config: BlueLMConfig, itemsize: int, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Tensors grouped into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in hf_tensors(config):
        nbytes = int(np.prod(t.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _header(tensors: list[HFTensor], dtype: str, itemsize: int) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        nbytes = int(np.prod(t.hf_shape)) * itemsize
        header[t.hf_name] = {"dtype": SAFETENSORS_TAGS[dtype], "shape": list(t.hf_shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_weights(directory: str, params: dict, config: BlueLMConfig, dtype: str,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes the safetensors file(s) (and the index when sharded) into `directory`; returns file names."""
    itemsize = 4 if dtype == "float32" else 2
    shards = plan_shards(config, itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    arrays = hf_arrays(params, config, dtype)
    weight_map, total = {}, 0
    for name, tensors in zip(names, shards):
        header = _header(tensors, dtype, itemsize)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for t in tensors:
                t2, a = next(arrays)
                assert t2.hf_name == t.hf_name
                f.write(a.tobytes())
                total += a.nbytes
                weight_map[t.hf_name] = name
    if len(shards) > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
    return names


def export_params(out_dir: str, params: dict, config: BlueLMConfig, tokenizer_model: bytes, dtype: str,
                  config_json: Optional[dict] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  force: bool = False) -> str:
    """Writes a Hugging Face directory from an in-memory parameter tree, atomically.

    config_json: the raw config.json to keep (its extra keys survive); default config.to_hf_dict().
    """
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r} (choose from {', '.join(EXPORT_DTYPES)})")
    out_dir = os.path.abspath(out_dir)
    with atomic_directory(out_dir, force, ExportError) as tmp:
        write_weights(tmp, params, config, dtype, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "wb") as f:
            f.write(config.to_hf_json(dtype, config_json))
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(tokenizer_model)
    return out_dir


def export_checkpoint(ckpt_dir: str, out_dir: str, adapter_dir: Optional[str] = None, dtype: str = "auto",
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False) -> str:
    """Converted bluelm-jax dir (optionally + LoRA adapter) -> Hugging Face dir; raises on bad input."""
    from bluelm_jax import checkpoint  # jax and Orbax: imported once the arguments are read

    ckpt_dir, out_dir = os.path.abspath(ckpt_dir), os.path.abspath(out_dir)
    if not os.path.isdir(ckpt_dir):
        raise ExportError(f"{ckpt_dir}: not a directory")
    if not checkpoint.is_converted_dir(ckpt_dir):
        hint = " (for a fine-tuning output, give its model/ directory)" if os.path.isdir(
            os.path.join(ckpt_dir, "model")) else ""
        raise ExportError(f"{ckpt_dir}: not a converted bluelm-jax checkpoint (no {checkpoint.METADATA_FILE}){hint}")
    refuse_overlap(out_dir, ckpt_dir, "checkpoint directory", ExportError)
    if adapter_dir is not None:
        refuse_overlap(out_dir, adapter_dir, "adapter directory", ExportError)
    refuse_existing(out_dir, force, ExportError)
    meta = checkpoint.read_metadata(ckpt_dir)
    if meta.get("quantization") is not None:
        raise ExportError(f"{ckpt_dir}: converted with {meta['quantization'].get('kind')} quantization; its float "
                          "weights are gone, so export the float checkpoint it was converted from")
    config_file = os.path.join(ckpt_dir, checkpoint.CONFIG_FILE)
    config = BlueLMConfig.from_json_file(config_file)
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    tokenizer_file = os.path.join(ckpt_dir, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_file):
        raise ExportError(f"{tokenizer_file}: missing")
    with open(tokenizer_file, "rb") as f:
        tokenizer_model = f.read()
    dtype = meta["param_dtype"] if dtype in (None, "auto") else dtype
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r} (choose from auto, {', '.join(EXPORT_DTYPES)})")
    params = checkpoint.restore_params(ckpt_dir, config)
    if adapter_dir is not None:
        from bluelm_jax import lora

        tree, lora_config, _ = lora.load(adapter_dir, config)
        params = lora.merge(params, tree, lora_config)
    return export_params(out_dir, params, config, tokenizer_model, dtype, raw, max_shard_bytes, force)
