"""Hugging Face BlueLM checkpoint -> a converted bluelm-jax (Orbax) directory, or parameters in memory.

    convert_hf_to_flax(hf_dir, out_dir, dtype="auto")   # the command line: bluelm-convert (hf/cli.py)
    load_hf_params(hf_dir, config)                      # what load() of a Hugging Face dir reads

Tensors are read one at a time (reader.py), renamed, transposed ([out, in] -> [in, out]) and
cast, and written block by block (up to ~64 MB of rows) straight into the Orbax arrays, one
leaf per tensor at its module path (params.py): peak memory is a few blocks plus the
tensor being read, never the checkpoint. The output is written into a temporary
directory beside `out_dir` and renamed into place at the end; on any error it is removed.
`out_dir` may not be, contain or lie inside `hf_dir` (so that `force` never deletes the
checkpoint being read).

tokenizer.model is required: every BlueLM release ships it, and `bluelm_jax.load()`
needs it beside the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bluelm_jax import checkpoint, hub, interrupts
from bluelm_jax.atomic_dir import refuse_existing, refuse_overlap
from bluelm_jax.config import BlueLMConfig
from bluelm_jax import quantize as Q
from bluelm_jax.params import (KERNEL, QVALUE, HFTensor, PathT, Quantization, as_quantization,
                               flatten, get_path, hf_tensors, leaves, param_shapes, set_path, shape_of,
                               weight_at)
from bluelm_jax.hf.reader import HFCheckpoint
from bluelm_jax.hf.tensors import FLOAT_DTYPES, ConversionError, check_names, resolve_dtype, to_layout

BLOCK_BYTES = 64 * 1024 * 1024  # largest block of a leaf written at once
# ------------------------------------------------------------------ checking


def check_tensors(ckpt: HFCheckpoint, config: BlueLMConfig, layout: str = KERNEL) -> dict[str, HFTensor]:
    """Expected tensors by name (with their leaves in `layout`); raises ConversionError on
    missing, unexpected, mis-shaped or non-float ones."""
    expected = {t.hf_name: t for t in hf_tensors(config, layout)}
    check_names(ckpt, list(expected))
    for name, t in expected.items():
        entry = ckpt.entries[name]
        if entry.shape != t.hf_shape:
            raise ConversionError(
                f"{entry.file}: tensor {name} has shape {list(entry.shape)}, expected {list(t.hf_shape)} "
                f"(from config.json)")
        if entry.dtype.name not in FLOAT_DTYPES:
            raise ConversionError(f"{entry.file}: tensor {name} has dtype {entry.dtype.name}, expected floating point")
    return expected


# ------------------------------------------------------------------ blocks


def _block_rows(rows: int, row_bytes: int) -> int:
    """Rows of a tensor converted and written at once."""
    return max(1, min(rows, BLOCK_BYTES // max(row_bytes, 1)))


def _quantized_block_rows(config: BlueLMConfig, path: PathT) -> int:
    """Output channels (rows of the [out, in] source) quantized at once: a block's float32 copy
    is at most BLOCK_BYTES."""
    n_in, n_out = shape_of(weight_at((*path[:-1], KERNEL)), config)
    return _block_rows(n_out, n_in * 4)


def leaf_specs(config: BlueLMConfig, dtype: str, layout: str = KERNEL,
               quantization: Optional[Quantization] = None) -> dict[PathT, checkpoint.LeafSpec]:
    """Shape, dtype and block shape of every leaf in `layout` (quantized by `quantization`),
    matching the blocks of `converted_blocks`."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    transposed = {t.path: t.transpose for t in hf_tensors(config, layout)}
    specs = {}
    for leaf in leaves(config, layout, quantization):
        path, shape = leaf.path, leaf.shape
        if leaf.dtype is not None:  # quantized: blocks of output channels, qvalue's rows, the scales' last axis
            rows = _quantized_block_rows(config, path)
            write = (rows, shape[1]) if path[-1] == QVALUE else (*shape[:-1], rows)
        elif len(shape) == 2:
            axis = 1 if transposed[path] else 0  # the axis of the source's rows
            rows = _block_rows(shape[axis], shape[1 - axis] * np_dtype.itemsize)
            write = (shape[0], rows) if axis else (rows, shape[1])
        else:
            write = shape
        specs[path] = checkpoint.LeafSpec(shape, np.dtype(leaf.dtype) if leaf.dtype else np_dtype, write)
    return specs


def _row_blocks(src: np.ndarray, spec: checkpoint.LeafSpec, transpose: bool) -> Iterator[tuple[tuple, np.ndarray]]:
    """Blocks of rows of a 2-D source [n, k] -> rows of the leaf, or its columns when transposed."""
    n = src.shape[0]
    rows = spec.write_shape[1] if transpose else spec.write_shape[0]
    for a in range(0, n, rows):
        b = min(a + rows, n)
        index = (slice(None), slice(a, b)) if transpose else (slice(a, b),)
        yield index, to_layout(src[a:b], transpose, spec.dtype)


def _quantized_blocks(src: np.ndarray, path: PathT, specs: dict[PathT, checkpoint.LeafSpec],
                      quantization: Quantization) -> Iterator[checkpoint.Block]:
    """A PyTorch projection src [out, in], quantized a block of output channels at a time: its
    quantized leaves' blocks (qvalue rows, the scales' last axis)."""
    rows = specs[(*path[:-1], QVALUE)].write_shape[0]
    for a in range(0, src.shape[0], rows):
        channels = slice(a, min(a + rows, src.shape[0]))
        with jax.default_device(jax.devices("cpu")[0]):
            quantized = Q.quantize_projection(src[channels], 1, quantization)
        for name, value in quantized.items():
            value = np.asarray(value)  # qvalue [channels, ...]; scales [..., channels]
            index = (channels,) if name == QVALUE else (*(slice(None),) * (value.ndim - 1), channels)
            yield (*path[:-1], name), index, value


def converted_blocks(ckpt: HFCheckpoint, expected: dict[str, HFTensor], specs: dict[PathT, checkpoint.LeafSpec],
                     progress: Any = None, quantization: Optional[Quantization] = None) -> Iterator[checkpoint.Block]:
    """Reads each expected tensor once and yields (leaf path, index, block) in our layout, the
    projections `quantization` covers as their quantized leaves."""
    for name, src in ckpt.tensors(set(expected)):
        t = expected[name]
        if quantization is not None and quantization.covers(t.path):
            blocks = _quantized_blocks(src, t.path, specs, quantization)
        elif src.ndim == 2:
            blocks = ((t.path, *block) for block in _row_blocks(src, specs[t.path], t.transpose))
        else:
            blocks = [(t.path, (), to_layout(src, False, specs[t.path].dtype))]
        yield from _reported(blocks, progress)
        del src


def _reported(blocks: Iterable[checkpoint.Block], progress: Any) -> Iterator[checkpoint.Block]:
    """`blocks`, each counted on the `progress` bar (if any) once yielded, with a pending
    Ctrl-C raised between blocks (interrupts.check)."""
    for path, index, value in blocks:
        yield path, index, value
        if progress is not None:
            progress.update(value.nbytes)
        interrupts.check()


def load_hf_params(hf_dir: str | os.PathLike, config: BlueLMConfig, dtype: Optional[str] = None,
                   layout: str = KERNEL, quantization: Optional[Quantization] = None) -> dict:
    """Reads a Hugging Face checkpoint into a parameter tree of numpy arrays (in memory), its
    projections in `layout` (WEIGHT: as PyTorch stores them, copied without a transpose), or
    quantized by `quantization` block by block as they are read.

    The arrays are allocated once, aligned (`checkpoint.aligned_empty`, so that jax adopts
    them on CPU without a copy), and filled block by block from the memory-mapped tensors.
    """
    ckpt = HFCheckpoint(hf_dir)
    expected = check_tensors(ckpt, config, layout)
    specs = leaf_specs(config, resolve_dtype(dtype, ckpt), layout, quantization)
    checkpoint.return_large_frees_to_the_os()
    tree: dict = {}
    for path, s in specs.items():
        set_path(tree, path, checkpoint.aligned_empty(s.shape, s.dtype))
    for path, index, value in converted_blocks(ckpt, expected, specs, quantization=quantization):
        get_path(tree, path)[index] = value
    return tree


# ------------------------------------------------------------------ conversion


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    out_dir: str
    tensors: int
    parameters: int
    bytes: int
    dtype: str
    seconds: float

    def line(self) -> str:
        return (f"converted {self.tensors} tensors, {self.parameters:,} parameters, {self.bytes / 1e9:.2f} GB "
                f"{self.dtype} in {self.seconds:.1f} s -> {self.out_dir}")


def convert_hf_to_flax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: Optional[str] = "auto",
                       force: bool = False, progress: bool = True,
                       quantize: Optional[Quantization | str] = None) -> ConversionSummary:
    """Converts `hf_dir` into a new bluelm-jax directory `out_dir`, atomically; raises on bad input.
    `quantize` ("int8", "int4" or a params.Quantization) stores the projections quantized, each
    quantized a block of output channels at a time as it streams (recorded in bluelm_jax.json)."""
    start = time.perf_counter()
    hf_dir, out_dir = os.path.abspath(hub.resolve(hf_dir)), os.path.abspath(out_dir)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory")
    refuse_overlap(out_dir, hf_dir, "Hugging Face directory", ConversionError)
    refuse_existing(out_dir, force, ConversionError)
    config_file = os.path.join(hf_dir, checkpoint.CONFIG_FILE)
    config = BlueLMConfig.from_json_file(config_file)
    quantization = as_quantization(quantize, config)
    tokenizer_file = os.path.join(hf_dir, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_file):
        raise ConversionError(f"{tokenizer_file}: missing (BlueLM checkpoints ship it; load() needs it)")
    ckpt = HFCheckpoint(hf_dir)
    dtype = resolve_dtype(dtype, ckpt)
    from bluelm_jax.hf.quantized import read_quantization

    packed = read_quantization(hf_dir)
    if packed is None:
        expected = check_tensors(ckpt, config)
        specs = leaf_specs(config, dtype, KERNEL, quantization)
        blocks = functools.partial(converted_blocks, ckpt, expected, specs, quantization=quantization)
        tensors = len(expected)
    else:
        quantization, specs, blocks = _packed_conversion(ckpt, config, dtype, quantization, packed)
        tensors = len(ckpt.entries)
    total_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in specs.values())

    parameters = sum(int(np.prod(shape)) for _, shape in flatten(param_shapes(config)))
    with open(config_file, "rb") as f:
        config_bytes = f.read()  # kept as released
    with open(tokenizer_file, "rb") as f:
        tokenizer_model = f.read()

    from tqdm import tqdm

    def write_params(params_dir: str) -> None:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress,
                  file=sys.stderr) as bar:
            checkpoint.save_params_streaming(params_dir, specs, blocks(progress=bar))

    extra = {} if quantization is None else {"quantization": quantization.describe()}
    checkpoint.write_converted_dir(out_dir, write_params, config_bytes, tokenizer_model, dtype, force,
                                   ConversionError, num_parameters=parameters, source_format=ckpt.format, **extra)
    stored = dtype if quantization is None else f"{dtype} ({quantization.kind} projections)"
    return ConversionSummary(out_dir, tensors, parameters, total_bytes, stored, time.perf_counter() - start)


def _packed_conversion(ckpt: HFCheckpoint, config: BlueLMConfig, dtype: str, quantization: Optional[Quantization],
                       packed: Any) -> tuple[Quantization, dict, Callable]:
    """A GPTQ/AWQ checkpoint (`packed`: its packed_int4.QuantizationConfig) converted into its int4
    tree (hf/quantized.py): (the tree's quantization, the leaf specs, blocks(progress) yielding each
    leaf whole as it is read)."""
    from bluelm_jax.hf.quantized import int4_quantization, int4_tree_leaves

    tree = int4_quantization(ckpt, packed)
    if quantization not in (None, tree):
        raise ConversionError(f"{ckpt.directory}: a GPTQ/AWQ checkpoint converts to its own int4 "
                              f"({tree.describe()}), not to {quantization.kind}")
    specs = {leaf.path: checkpoint.LeafSpec(leaf.shape, np.dtype(leaf.dtype or dtype), leaf.shape)
             for leaf in leaves(config, KERNEL, tree)}

    def blocks(progress: Any = None) -> Iterator[checkpoint.Block]:
        leaves_read = int4_tree_leaves(ckpt, config, tree, dtype)
        return _reported(((path, (), value) for path, value in leaves_read), progress)

    return tree, specs, blocks
