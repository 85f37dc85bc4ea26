"""What every reader of Hugging Face tensors shares: its error, the parameter dtype it resolves,
and how a PyTorch tensor becomes a leaf (cast, and [out, in] -> [in, out] where the leaf is a kernel).

Used by hf/to_orbax.py (float checkpoints) and hf/quantized.py (GPTQ/AWQ checkpoints).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from bluelm_jax import checkpoint
from bluelm_jax.params import IGNORED_HF_TENSORS
from bluelm_jax.hf.reader import HFCheckpoint

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class ConversionError(ValueError):
    """A Hugging Face directory that does not hold the checkpoint its config.json describes."""


def name_list(names: list[str], limit: int = 4) -> str:
    """The first `limit` names, and how many more, for an error line."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_names(ckpt: HFCheckpoint, expected: Sequence[str]) -> None:
    """ConversionError unless the checkpoint holds exactly the `expected` tensors (buffers that are
    recomputed, params.IGNORED_HF_TENSORS, aside); missing names are listed in `expected`'s order."""
    present = {n for n in ckpt.entries if not IGNORED_HF_TENSORS.search(n)}
    missing = [n for n in expected if n not in present]
    if missing:
        raise ConversionError(f"{ckpt.directory}: {len(missing)} tensor(s) missing: {name_list(missing)}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise ConversionError(f"{ckpt.directory}: {len(unexpected)} unexpected tensor(s): {name_list(unexpected)}")


def resolve_dtype(dtype: Optional[str], ckpt: HFCheckpoint) -> str:
    """'bfloat16' or 'float32'. auto/None keeps bfloat16 or float32 as stored; float16/float64 become float32."""
    if dtype not in (None, "auto"):
        return checkpoint.dtype_name(dtype)
    stored = ckpt.entries["model.embed_tokens.weight"].dtype.name
    return stored if stored in checkpoint.PARAM_DTYPES else "float32"


def to_layout(src: np.ndarray, transpose: bool, dtype: np.dtype) -> np.ndarray:
    """Cast to `dtype`, then transpose when the HF tensor is [out, in]."""
    a = src if src.dtype == dtype else src.astype(dtype)
    return checkpoint.host_transpose(a) if transpose else np.ascontiguousarray(a)
