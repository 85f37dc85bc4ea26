"""The packed 4-bit formats of GPTQ and AWQ checkpoints, read and written in plain numpy.

BlueLM-7B-Chat-32K-GPTQ and -AWQ store each quantized linear layer as `qweight` (int32 words
holding eight 4-bit integers each), `qzeros` (the packed zero points), `scales` (float16, one per
group and output column) and, for GPTQ, `g_idx` (the group of every input row). This module
unpacks those tensors to integers, dequantizes them to float32 and packs integers back into the
same words (for test fixtures), and turns one layer into the project's int4 leaves
(`project_int4_leaves`: signed nibbles packed by quantize.pack_int4 on the host CPU, scales, and
offsets that fold the zero points in). It knows nothing about models or files: the caller hands
it the arrays of one layer.

Layouts. A word's nibble k is bits 4k..4k+3 (k = 0 is the least significant nibble); words are
read as unsigned 32-bit integers, so nibble 7 is the sign bit's nibble of the stored int32.

- GPTQ (AutoGPTQ, GPTQModel, and the transformers/optimum integration that loads them):
  `qweight` [in/8, out] packs along the input axis: word [r, o], nibble k holds q[8r + k, o].
  `qzeros` [groups, out/8] packs along the output axis: word [g, c], nibble k holds the zero
  point of output column 8c + k. `scales` [groups, out]. `g_idx` [in], default i // group_size;
  with act_order (`desc_act`) it is a permutation-derived, unsorted map, while the rows of
  `qweight` stay in the original input order. In the default checkpoint format
  (`checkpoint_format` "gptq", also when the field is absent) a nibble of `qzeros` holds the
  zero point minus one, so zero points 1..16 are representable (a symmetric checkpoint,
  `sym: true`, stores 7 everywhere: zero point 8); `checkpoint_format` "gptq_v2" (GPTQModel)
  stores the zero point itself. Weight: w[i, o] = (q[i, o] - zero[g_idx[i], o]) *
  scale[g_idx[i], o].
- AWQ, version "gemm" (AutoAWQ, and transformers' AWQ integration): `qweight` [in, out/8] and
  `qzeros` [groups, out/8] both pack along the output axis with an interleaved order: word
  [., c], nibble k holds column 8c + AWQ_PACK_ORDER[k], AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5,
  7); so the nibbles of one word, from least significant, are columns 0, 2, 4, 6, 1, 3, 5, 7 of
  its block. Zero points are stored as they are. Weight: w[i, o] = (q[i, o] - zero[i //
  group_size, o]) * scale[i // group_size, o].

Where these layouts come from: AutoGPTQ's reference QuantLinear (its packer subtracts one from
the zero points and its unpacker adds it back, with shifts 4k along the input axis for qweight
and the output axis for qzeros); GPTQModel's and vLLM's descriptions of the "gptq" (v1) and
"gptq_v2" checkpoint formats, which differ only in that offset; AutoAWQ's GEMM layer (its packer
places column AWQ_PACK_ORDER[k] of a block at shift 4k for both qweight and qzeros, and requires
zero points) and its dequantizer, which undoes the order and groups rows as i // group_size
(its repacking into the exllama GPTQ layout subtracts one from AWQ's zero points: the same v1
convention seen from the other side). tests/test_packed_int4.py pins each layout with words
written out by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

BITS = 4
NIBBLES_PER_WORD = 32 // BITS  # 8
NIBBLE_MASK = (1 << BITS) - 1  # 0xF
# AWQ "gemm": nibble k of a word holds column AWQ_PACK_ORDER[k] of the word's 8-column block.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Its inverse: column j of a block sits in nibble AWQ_UNPACK_ORDER[j] (= 0, 4, 1, 5, 2, 6, 3, 7).
AWQ_UNPACK_ORDER = tuple(int(k) for k in np.argsort(AWQ_PACK_ORDER))

SUPPORTED_METHODS = ("gptq", "awq")
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
# What a GPTQ qzeros nibble holds: the zero point minus this offset.
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """The `quantization_config` of a packed 4-bit checkpoint's config.json.

    method: "gptq" or "awq". group_size: input rows per group, -1 for one group over all rows.
    desc_act: GPTQ act_order (g_idx unsorted); False for AWQ. zero_point: whether zero points
    carry information (AWQ `zero_point`; GPTQ `sym: false`). version: the packing variant, GPTQ's
    `checkpoint_format` ("gptq" or "gptq_v2") or AWQ's `version` ("gemm").
    """

    method: str
    bits: int
    group_size: int
    desc_act: bool
    zero_point: bool
    version: str

    @property
    def gptq_zero_offset(self) -> int:
        """What GPTQ subtracts from a zero point before packing it (1 in format "gptq")."""
        return GPTQ_ZERO_OFFSETS[self.version]


def read_quantization_config(config_dict: Mapping[str, Any]) -> Optional[QuantizationConfig]:
    """The packed-int4 description of a config.json dict, or None when it has none.

    Raises ValueError, naming the field and its value, for anything this module cannot read.
    """
    raw = config_dict.get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"quantization_config: expected an object, got {raw!r}")
    method = str(raw.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise ValueError(
            f"quantization_config.quant_method={raw.get('quant_method')!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_METHODS)})"
        )
    bits = raw.get("bits")
    if bits != BITS:
        raise ValueError(f"quantization_config.bits={bits!r} is not supported (only {BITS})")
    group_size = raw.get("group_size", 128)
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"quantization_config.group_size={group_size!r}: expected -1 or a positive integer")
    if method == "gptq":
        return _read_gptq_config(raw, group_size)
    return _read_awq_config(raw, group_size)


def _read_gptq_config(raw: Mapping[str, Any], group_size: int) -> QuantizationConfig:
    version = raw.get("checkpoint_format") or "gptq"
    if raw.get("is_marlin_format"):
        version = "marlin"
    if version not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(
            f"quantization_config.checkpoint_format={version!r} is not supported "
            f"(supported: {', '.join(GPTQ_CHECKPOINT_FORMATS)})"
        )
    return QuantizationConfig(
        method="gptq",
        bits=BITS,
        group_size=group_size,
        desc_act=bool(raw.get("desc_act", False)),
        zero_point=not bool(raw.get("sym", True)),
        version=version,
    )


def _read_awq_config(raw: Mapping[str, Any], group_size: int) -> QuantizationConfig:
    version = str(raw.get("version", "gemm")).lower()
    if version not in AWQ_VERSIONS:
        raise ValueError(
            f"quantization_config.version={raw.get('version')!r} is not supported "
            f"(supported: {', '.join(AWQ_VERSIONS)})"
        )
    zero_point = raw.get("zero_point", True)
    if zero_point is not True:
        raise ValueError(
            f"quantization_config.zero_point={zero_point!r} is not supported (AWQ gemm stores zero points)"
        )
    return QuantizationConfig(
        method="awq", bits=BITS, group_size=group_size, desc_act=False, zero_point=True, version=version
    )


# ----------------------------------------------------------------------------------------------
# Nibbles <-> words along the last axis (nibble k of word j = value 8j + k).


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[..., n] integers in 0..15 -> [..., n/8] int32 words; value 8j + k goes to nibble k of word j."""
    values = np.asarray(values)
    _check_whole_words(values.shape[-1])
    if values.size and (values.min() < 0 or values.max() > NIBBLE_MASK):
        raise ValueError(f"4-bit values must lie in 0..15, got {values.min()}..{values.max()}")
    grouped = values.astype(np.uint32).reshape(*values.shape[:-1], -1, NIBBLES_PER_WORD)  # [..., n/8, 8]
    shifts = np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * BITS  # [8]
    words = np.bitwise_or.reduce(grouped << shifts, axis=-1)  # [..., n/8] uint32
    return words.astype(np.uint32).view(np.int32)


def _check_whole_words(count: int) -> None:
    if count % NIBBLES_PER_WORD:
        raise ValueError(f"cannot pack {count} values into whole 32-bit words (need a multiple of 8)")


def unpack_nibbles(words: np.ndarray) -> np.ndarray:
    """[..., m] int32 words -> [..., 8m] uint8 values; nibble k of word j becomes value 8j + k."""
    # Byte b of a little-endian word holds nibble 2b (low half) and nibble 2b + 1 (high half);
    # splitting bytes is several times faster than shifting whole words eight times.
    words = _unsigned_words(words)  # [..., m]
    as_bytes = np.ascontiguousarray(words.astype("<u4", copy=False)).view(np.uint8)  # [..., 4m]
    nibbles = np.empty((*as_bytes.shape, 2), np.uint8)  # [..., 4m, 2]
    nibbles[..., 0] = as_bytes & NIBBLE_MASK
    nibbles[..., 1] = as_bytes >> BITS
    return nibbles.reshape(*words.shape[:-1], NIBBLES_PER_WORD * words.shape[-1])


def _unsigned_words(words: np.ndarray) -> np.ndarray:
    """32-bit integer words (of either byte order) as native uint32; ValueError for anything else."""
    words = np.asarray(words)
    if words.dtype.kind not in "iu" or words.dtype.itemsize != 4:
        raise ValueError(f"packed 4-bit words must be int32, got {words.dtype}")
    return words.astype(words.dtype.newbyteorder("="), copy=False).view(np.uint32)


# ----------------------------------------------------------------------------------------------
# GPTQ


def pack_gptq_qweight(q: np.ndarray) -> np.ndarray:
    """[in, out] integers 0..15 -> qweight [in/8, out] int32 (packed along the input axis)."""
    return np.ascontiguousarray(pack_nibbles(np.asarray(q).T).T)


def unpack_gptq_qweight(qweight: np.ndarray) -> np.ndarray:
    """qweight [in/8, out] int32 -> [in, out] uint8 in 0..15."""
    return np.ascontiguousarray(unpack_nibbles(np.asarray(qweight).T).T)


def pack_gptq_qzeros(zeros: np.ndarray, zero_offset: int = 1) -> np.ndarray:
    """Zero points [groups, out] -> qzeros [groups, out/8] int32, storing zero - zero_offset.

    zero_offset is 1 in the default "gptq" checkpoint format (zero points 1..16) and 0 in
    "gptq_v2" (0..15); a zero point outside that range raises ValueError.
    """
    stored = np.asarray(zeros).astype(np.int64) - zero_offset  # [groups, out]
    if stored.size and (stored.min() < 0 or stored.max() > NIBBLE_MASK):
        raise ValueError(
            f"GPTQ zero points must lie in {zero_offset}..{NIBBLE_MASK + zero_offset} with zero offset "
            f"{zero_offset}, got {stored.min() + zero_offset}..{stored.max() + zero_offset}"
        )
    return pack_nibbles(stored)


def unpack_gptq_qzeros(qzeros: np.ndarray, zero_offset: int = 1) -> np.ndarray:
    """qzeros [groups, out/8] int32 -> zero points [groups, out] int32 (stored nibble + zero_offset)."""
    return unpack_nibbles(qzeros).astype(np.int32) + zero_offset


def default_g_idx(in_features: int, group_size: int) -> np.ndarray:
    """[in] int32: the group of each input row without act_order (i // group_size)."""
    rows_per_group = in_features if group_size == -1 else group_size
    return (np.arange(in_features) // rows_per_group).astype(np.int32)


def dequantize_gptq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: Optional[np.ndarray] = None,
    *,
    group_size: int = 128,
    zero_offset: int = 1,
) -> np.ndarray:
    """One GPTQ layer -> float32 weight [in, out] = (q - zero[g_idx]) * scale[g_idx].

    qweight [in/8, out], qzeros [groups, out/8], scales [groups, out], g_idx [in] (None: the
    default i // group_size; group_size is used only then).
    """
    q = unpack_gptq_qweight(qweight)  # [in, out]
    zeros = unpack_gptq_qzeros(qzeros, zero_offset).astype(np.float32)  # [groups, out]
    scales = np.asarray(scales).astype(np.float32)  # [groups, out]
    in_features, out_features = q.shape
    if g_idx is None:
        g_idx = default_g_idx(in_features, group_size)
    g_idx = np.asarray(g_idx).astype(np.int64)  # [in]
    _check_group_tensors("GPTQ", q.shape, zeros.shape, scales.shape)
    if g_idx.shape != (in_features,):
        raise ValueError(
            f"GPTQ g_idx has shape {g_idx.shape}, expected ({in_features},) for qweight {np.shape(qweight)}"
        )
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= scales.shape[0]):
        raise ValueError(f"GPTQ g_idx values {g_idx.min()}..{g_idx.max()} fall outside the {scales.shape[0]} groups")
    return (q.astype(np.float32) - zeros[g_idx]) * scales[g_idx]  # [in, out]


# ----------------------------------------------------------------------------------------------
# AWQ (gemm)


def pack_awq_columns(values: np.ndarray) -> np.ndarray:
    """[rows, out] integers 0..15 -> [rows, out/8] int32 in AWQ's interleaved column order."""
    values = np.asarray(values)
    rows, out_features = values.shape
    _check_whole_words(out_features)
    blocks = values.reshape(rows, -1, NIBBLES_PER_WORD)  # [rows, out/8, 8 columns]
    by_nibble = blocks[:, :, list(AWQ_PACK_ORDER)]  # [rows, out/8, 8 nibbles]
    return pack_nibbles(by_nibble.reshape(rows, out_features))


def unpack_awq_columns(words: np.ndarray) -> np.ndarray:
    """[rows, out/8] int32 in AWQ's interleaved order -> [rows, out] uint8 in 0..15."""
    nibbles = unpack_nibbles(words)  # [rows, out] in nibble order
    rows = nibbles.shape[0]
    by_nibble = nibbles.reshape(rows, -1, NIBBLES_PER_WORD)  # [rows, out/8, 8 nibbles]
    return by_nibble[:, :, list(AWQ_UNPACK_ORDER)].reshape(rows, -1)  # [rows, out]


# qweight [in, out/8] and qzeros [groups, out/8] share the one layout; zero points are stored as is.
pack_awq_qweight = pack_awq_columns
unpack_awq_qweight = unpack_awq_columns
pack_awq_qzeros = pack_awq_columns
unpack_awq_qzeros = unpack_awq_columns


def dequantize_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, *, group_size: int) -> np.ndarray:
    """One AWQ gemm layer -> float32 weight [in, out] = (q - zero[i // group_size]) * scale[i // group_size].

    qweight [in, out/8], qzeros [groups, out/8], scales [groups, out].
    """
    q = unpack_awq_qweight(qweight)  # [in, out]
    zeros = unpack_awq_qzeros(qzeros).astype(np.float32)  # [groups, out]
    scales = np.asarray(scales).astype(np.float32)  # [groups, out]
    _check_group_tensors("AWQ", q.shape, zeros.shape, scales.shape)
    group_of_row = default_g_idx(q.shape[0], group_size)  # [in]
    if group_of_row.size and group_of_row.max() >= scales.shape[0]:
        raise ValueError(
            f"AWQ: {q.shape[0]} input rows in groups of {group_size} need {group_of_row.max() + 1} groups, "
            f"scales have {scales.shape[0]}"
        )
    return (q.astype(np.float32) - zeros[group_of_row]) * scales[group_of_row]  # [in, out]


# ----------------------------------------------------------------------------------------------
# Either format


def dequantize_linear(
    config: QuantizationConfig,
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: Optional[np.ndarray] = None,
    *,
    out_in: bool = False,
) -> np.ndarray:
    """One packed layer of either format -> float32 [in, out], or [out, in] (PyTorch's layout) if out_in."""
    if config.method == "gptq":
        weight = dequantize_gptq(
            qweight, qzeros, scales, g_idx, group_size=config.group_size, zero_offset=config.gptq_zero_offset
        )
    else:
        weight = dequantize_awq(qweight, qzeros, scales, group_size=config.group_size)
    return np.ascontiguousarray(weight.T) if out_in else weight


def _check_group_tensors(method: str, weight_shape, zeros_shape, scales_shape) -> None:
    """Unpacked q [in, out], zeros [groups, out] and scales [groups, out] must agree."""
    if zeros_shape != scales_shape or scales_shape[1] != weight_shape[1]:
        raise ValueError(
            f"{method}: unpacked qweight {weight_shape}, qzeros {zeros_shape} and scales {scales_shape} "
            "disagree (expected [in, out], [groups, out], [groups, out])"
        )


# ----------------------------------------------------------------------------------------------
# Into the project's int4 leaves


# A project int4 nibble is signed (-8..7): the unsigned GPTQ/AWQ level q (0..15) is q - 8.
SIGNED_SHIFT = 8


def project_int4_leaves(
    config: QuantizationConfig,
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: Optional[np.ndarray] = None,
) -> Optional[dict[str, np.ndarray]]:
    """One packed layer -> the project's int4 leaves, or None when its groups are not contiguous.

    Returns {"qvalue": int8 [out, in/2] (quantize.pack_int4 of q - 8 along axis 1 in groups of
    the checkpoint's group size), "scale": float32 [groups, out], "offset": float32 [groups, out]}
    with q_signed * scale + offset = scale * (q - zero) (the format's own dequantization):
    q_signed = q - 8 and offset = scale * (8 - zero). Both sides are exact in float32 for
    float16 scales (a 4-bit integer times an 11-bit mantissa). For a symmetric checkpoint
    (`config.zero_point` False) every zero point must be 8 and "offset" is left out.

    None: a GPTQ act_order layer (g_idx other than i // group_size), whose groups interleave
    input rows and so have no contiguous form; dequantize it instead (`dequantize_linear`).
    """
    if config.method == "gptq":
        q = unpack_gptq_qweight_out_in(qweight)  # [out, in]
        zeros = unpack_gptq_qzeros(qzeros, config.gptq_zero_offset)  # [groups, out]
    else:
        q = unpack_awq_qweight_out_in(qweight)  # [out, in]
        zeros = unpack_awq_qzeros(qzeros).astype(np.int32)  # [groups, out]
    scales = np.asarray(scales).astype(np.float32)  # [groups, out]
    _check_group_tensors(config.method.upper(), q.shape[::-1], zeros.shape, scales.shape)
    in_features = q.shape[1]
    group = in_features if config.group_size == -1 else config.group_size
    if in_features % group or in_features // group != scales.shape[0]:
        raise ValueError(
            f"{config.method.upper()}: {in_features} input rows in groups of {group} do not make the "
            f"{scales.shape[0]} groups of scales {scales.shape}"
        )
    if g_idx is not None and not np.array_equal(np.asarray(g_idx), default_g_idx(in_features, group)):
        return None
    leaves = {"qvalue": _pack_project_int4(q.astype(np.int8) - SIGNED_SHIFT, group), "scale": scales}
    if config.zero_point:
        leaves["offset"] = scales * (SIGNED_SHIFT - zeros).astype(np.float32)  # [groups, out]
    elif np.any(zeros != SIGNED_SHIFT):
        raise ValueError(
            f"{config.method.upper()}: a symmetric checkpoint (sym: true) must have zero point "
            f"{SIGNED_SHIFT} everywhere, found {zeros.min()}..{zeros.max()}"
        )
    return leaves


def unpack_gptq_qweight_out_in(qweight: np.ndarray) -> np.ndarray:
    """qweight [in/8, out] int32 -> [out, in] uint8 in 0..15 (`unpack_gptq_qweight` transposed,
    unpacked from the transposed words: a uint8 transpose of the whole layer is several times slower)."""
    return unpack_nibbles(np.ascontiguousarray(np.asarray(qweight).T))


def unpack_awq_qweight_out_in(qweight: np.ndarray) -> np.ndarray:
    """qweight [in, out/8] int32 -> [out, in] uint8 in 0..15 (`unpack_awq_qweight` transposed):
    nibble k of the transposed words [out/8, in] is output row 8c + AWQ_PACK_ORDER[k]."""
    words = np.ascontiguousarray(_unsigned_words(qweight).T)  # [out/8, in]
    levels = np.empty((words.shape[0], NIBBLES_PER_WORD, words.shape[1]), np.uint8)  # [out/8, 8, in]
    for k, column in enumerate(AWQ_PACK_ORDER):
        levels[:, column, :] = (words >> np.uint32(BITS * k)) & np.uint32(NIBBLE_MASK)
    return levels.reshape(-1, words.shape[1])


def _pack_project_int4(q_signed: np.ndarray, group: int) -> np.ndarray:
    """q_signed int8 [out, in] in -8..7 -> int8 [out, in/2] in the project's int4 layout."""
    import jax

    from bluelm_jax import quantize

    with jax.default_device(jax.devices("cpu")[0]):  # host arrays in, a host array out
        return np.asarray(quantize.pack_int4(q_signed, in_axis=1, group=group))
