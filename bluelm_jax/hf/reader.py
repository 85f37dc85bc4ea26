"""Streaming reader of a Hugging Face checkpoint directory, one tensor at a time.

Formats, detected in this order:

    model.safetensors.index.json  + the shards it names
    model.safetensors
    model-*.safetensors           (shards without an index)
    pytorch_model.bin.index.json  + the shards it names     (needs torch)
    pytorch_model.bin
    pytorch_model-*.bin

Safetensors files are parsed here (header validated against the file size) and each tensor
is a read-only `np.memmap` of its bytes, so a tensor costs memory only while it is in use.
PyTorch pickles load through `torch.load(weights_only=True, mmap=True)`; after each tensor
is used, its pages are released with madvise so that resident memory stays bounded.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import json
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
from typing import Iterator, Optional

import ml_dtypes
import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tag -> numpy dtype
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class CheckpointFormatError(ValueError):
    """A checkpoint directory or file that cannot be read; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, shape, dtype and (safetensors) byte offset."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int = 0  # absolute byte offset in a safetensors file


class HFCheckpoint:
    """The tensors of a checkpoint directory, indexed by name; `tensors()` streams them."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.format, self.files = _detect(self.directory)  # "safetensors" | "bin", shard paths
        self.entries: dict[str, TensorEntry] = {}
        for path in self.files:
            entries = read_safetensors_header(path) if self.format == "safetensors" else _bin_entries(path)
            for e in entries:
                if e.name in self.entries:
                    raise CheckpointFormatError(
                        f"{path}: tensor {e.name} also in {self.entries[e.name].file}")
                self.entries[e.name] = e
        self._check_index()

    def _check_index(self) -> None:
        """Every tensor the index names must be in the shard it names."""
        index = os.path.join(self.directory, SAFETENSORS_INDEX if self.format == "safetensors" else BIN_INDEX)
        if not os.path.exists(index):
            return
        for name, file in _weight_map(index).items():
            entry = self.entries.get(name)
            if entry is None or os.path.basename(entry.file) != file:
                raise CheckpointFormatError(f"{index}: tensor {name} is not in {file}")

    def __len__(self) -> int:
        return len(self.entries)

    def tensors(self, names: Optional[set[str]] = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, read-only array) one tensor at a time, in file order (all tensors, or `names`)."""
        for path in self.files:
            wanted = [e for e in self.entries.values() if e.file == path and (names is None or e.name in names)]
            if not wanted:
                continue
            if self.format == "safetensors":
                for e in sorted(wanted, key=lambda e: e.offset):
                    yield e.name, _memmap(e)
            else:
                yield from _bin_tensors(path, wanted)


# ------------------------------------------------------------------ detection


def _detect(directory: str) -> tuple[str, list[str]]:
    """(format, shard paths) of a checkpoint directory."""
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"{directory}: not a directory")
    join = lambda name: os.path.join(directory, name)  # noqa: E731
    for fmt, index, single, pattern in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "model-*.safetensors"),
                                        ("bin", BIN_INDEX, BIN_SINGLE, "pytorch_model-*.bin")):
        if os.path.exists(join(index)):
            files = sorted(set(_weight_map(join(index)).values()))
            missing = [f for f in files if not os.path.isfile(join(f))]
            if missing:
                raise CheckpointFormatError(f"{join(index)}: shard file(s) missing: {', '.join(missing)}")
            return fmt, [join(f) for f in files]
        if os.path.isfile(join(single)):
            return fmt, [join(single)]
        shards = sorted(glob.glob(join(pattern)))
        if shards:
            return fmt, shards
    raise CheckpointFormatError(
        f"{directory}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{BIN_SINGLE} or {BIN_INDEX})")


def _weight_map(index_path: str) -> dict[str, str]:
    """The `weight_map` of an index file: tensor name -> shard file name."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{index_path}: malformed index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v for k, v in weight_map.items()):
        raise CheckpointFormatError(f"{index_path}: malformed index (weight_map must map names to file names)")
    return weight_map


# ------------------------------------------------------------------ safetensors


def read_safetensors_header(path: str) -> list[TensorEntry]:
    """Parses and validates a safetensors header against the file size; raises CheckpointFormatError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointFormatError(
                f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header entry for {name}: {info!r}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header entry for {name}: {info!r}")
        if 8 + n + end > size:
            raise CheckpointFormatError(
                f"{path}: truncated safetensors file (tensor {name} ends at byte {8 + n + end}, "
                f"file has {size} bytes)")
        entries.append(TensorEntry(name, path, shape, dtype, 8 + n + begin))
    return entries


def _memmap(e: TensorEntry) -> np.ndarray:
    """A read-only view of one safetensors tensor; its pages are unmapped when it is freed."""
    if math.prod(e.shape) == 0:
        return np.zeros(e.shape, e.dtype)
    return np.memmap(e.file, dtype=e.dtype, mode="r", offset=e.offset, shape=e.shape)


# ------------------------------------------------------------------ PyTorch pickles


TORCH_EXTRA = 'pip install "bluelm-jax[torch]"'


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointFormatError(
            f"reading pytorch_model*.bin needs torch ({TORCH_EXTRA}), or convert the checkpoint "
            "to safetensors") from None
    return torch


def _load_bin(path: str) -> dict:
    """torch.load with weights_only=True and mmap=True; raises CheckpointFormatError.

    A pickle that asks for anything but tensors and plain containers (code to run, arbitrary
    objects) is refused by torch's weights-only unpickler and reported as such, in our words:
    torch's own message goes on to suggest weights_only=False, which would run that code.
    """
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointFormatError(
            f"{path}: holds code or objects that are not tensors"
            f"{f' ({asked.group(1)})' if asked else ''}, so it will not be loaded (unpickling it could run "
            "code); convert it to safetensors with a tool you trust, or use a safetensors release") from None
    except OSError:
        raise  # reported as "<file>: <reason>"
    except Exception as e:  # torch raises many types for corrupt files
        if not zipfile.is_zipfile(path):
            raise CheckpointFormatError(
                f"{path}: cannot read PyTorch checkpoint: not a zip archive (corrupt, truncated, or saved by "
                "PyTorch older than 1.6)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointFormatError(
            f"{path}: cannot read PyTorch checkpoint, corrupt or truncated ({type(e).__name__}: "
            f"{first[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(f"{path}: not a state dict of tensors")
    return state


def _torch_dtype_to_numpy(dtype) -> np.dtype:
    torch = _torch()
    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def _bin_entries(path: str) -> list[TensorEntry]:
    """The tensors of one .bin shard (loading is lazy: mmap)."""
    state = _load_bin(path)
    return [TensorEntry(n, path, tuple(t.shape), _torch_dtype_to_numpy(t.dtype)) for n, t in state.items()]


def _bin_tensors(path: str, wanted: list[TensorEntry]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields the wanted tensors of one .bin shard as numpy views of the mapped file."""
    torch = _torch()
    state = _load_bin(path)
    for e in wanted:
        t = state.pop(e.name)
        mapped = t.is_contiguous()  # a view of the mapped file, not a copy
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            array = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            array = t.numpy()
        array.flags.writeable = False
        yield e.name, array
        if mapped:
            _release_pages(t.data_ptr(), t.numel() * t.element_size())
        del t, array


_MADV_DONTNEED = 4


def _release_pages(address: int, nbytes: int) -> None:
    """Drops the (clean, file-backed) pages of a used tensor from this process's resident set."""
    page = mmap.PAGESIZE
    start = (address + page - 1) // page * page
    end = (address + nbytes) // page * page
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass
