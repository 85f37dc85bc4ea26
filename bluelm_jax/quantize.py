"""Weight-only quantization of projection weights: int8 per output channel and int4 in groups.

Pure functions, no model: a weight is a 2-D array whose input axis is `in_axis` (0 for the
KERNEL layout [in, out], 1 for the WEIGHT layout [out, in]; params.py). Activations stay in
floating point (weight-only quantization); products return float32.

- int8: symmetric, one float32 scale per output channel, scale = max|w| / 127 over the input
  axis; q = round(w / scale) in [-127, 127], stored int8 in the weight's own layout.
- int4: symmetric, one float32 scale per group of GROUP consecutive inputs and output channel,
  scale = max|w| / 7 over the group, q in [-7, 7]. Two values share a byte: within each group,
  the low nibble of byte j holds input j and the high nibble holds input j + GROUP/2, so the
  packed array is the weight's layout with the input axis halved, and unpacking a group is
  two shifts and a concatenation (no interleave). Scales are [in / GROUP, out] in both layouts.
  Packed, an int4 weight takes 4.25 bits per value with its scales (int8: 8 bits plus one
  scale per output channel). No zero points: the levels are symmetric around 0.
  A zero channel or group gets scale 0 and q 0, and dequantizes to exact zeros.

Products (`int8_product`, `int4_product`). XLA on CPU does not fuse a dequantizing convert
into its dot: dequantize-then-dot writes the whole float weight each step, and a
multiply-reduce over [out, in] is slow at one row (XLA hands it to a library kernel that is
fast at 8 rows only). On CPU:
- int8 applies its per-channel scale after the dot (exact: the scale is constant along the
  contraction), so the dot is by q's integers. Up to CPU_DIGIT_ROWS rows, x is written per
  row in fixed point, X_DIGITS base-256 int8 digits on a power-of-two step (22 bits below the
  row's largest value), and the digits times q are one int8 x int8 -> int32 dot that reads q
  as stored and is exact; the digits' products are recombined in float32. This is not
  activation quantization: x is kept to within 2^-22 of its row's largest value, errors the
  size of float32's rounding of the sum (measured 2.8e-7 of the largest output at 1 row,
  against 4.7e-7 for float32 blocks). More rows, where the integer dot's cost grows with
  X_DIGITS times the rows, and a [in, out] weight take float32 blocks as int4 does (below),
  blocks only converted.
- int4 (and int8 beyond CPU_DIGIT_ROWS rows or [in, out]) runs blocked: a loop (`lax.map`)
  over blocks of OUT_BLOCK output channels of a [out, in] weight dequantizes one block
  (OUT_BLOCK x in float32, cache-sized) and multiplies it by x with a float32 dot, so no more
  than one block is ever at full precision. A [in, out] weight is walked over blocks of input
  rows instead (`lax.scan`, accumulating the float32 result); there the integer dot measured
  0.7x the float32 blocks' time at 1 row but 1.45x at 8.
Measured for one [4096, 11008] [out, in] weight on this project's 2-core machine, heavily
loaded by other work (load average ~8: times are several times a quiet machine's, compare
ratios), medians of 11 interleaved calls at 1 / 2 / 4 / 8 / 16 / 32 rows: float32 dot
([in, out]) 19.2 / 40.2 / 68.1 / 95.0 / 124.5 / 198.6 ms; bfloat16 weight
(model._bf16_weight_matmul) 1.55 / 0.89 / 0.57 / 0.48 / 0.44 / 0.64 of float32; int8 with
the scale inside each dequantized block (this module before) 1.18 / 1.04 / 0.70 / 0.54 /
0.47 / 0.41; int8 now 0.37 / 0.35 / 0.24 / 0.45 / 0.41 / 0.38 (the integer dot forced at 16
and 32 rows: 0.56 / 0.78); int4 packed blocked 1.23 / 1.28 / 0.81 / 0.76 / 0.55 / 0.46.
Converting int8 blocks to bfloat16 for a bfloat16 dot measured 2-3x slower than the integer
dot, and XLA's own int8 -> bfloat16 convert several times slower than int8 -> float32.
`python -m bench.cpu_products` gives the side-by-side table.

Off the CPU (GPU, TPU) XLA did not fuse a dequantizing multiply into its dot either (on an
H200, dequantize-then-dot read int8 weights at 0.16 of the copy bandwidth, against 0.36 for a
bfloat16 dot). There, up to ACCELERATOR_REDUCE_ROWS rows (decode at batch 1) a product is a
multiply-reduce, one fusion that reads the integers once (`_int8_accelerator_product`,
`_int4_accelerator_reduce`); more rows convert int8 to x's dtype inside the dot and scale
after it, and int4 dequantizes then dots. bench/accelerator_checks.py times each formulation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from bluelm_jax import params as P

INT8_MAX = 127
INT4_MAX = 7  # symmetric: levels -7..7 (the nibble's -8 is never used)
GROUP = P.INT4_GROUP  # int4 inputs per scale (params.Quantization's default)
# Up to this many rows, products off the CPU are multiply-reduces that read the integers once.
# bench/accelerator_checks.py on an H200, one [11008, 4096] weight, fraction of the copy
# bandwidth: 1 row: int8 multiply-reduce 0.71, convert-dot-scale 0.28, dequantize-then-dot 0.16,
# bf16 dot 0.36; int4 multiply-reduce 0.17-0.23, dequantize-then-dot 0.10. 4 rows: int8 reduce
# 0.27 against convert-dot-scale 0.42; int4 reduce 0.08 against dequantize-then-dot 0.15.
ACCELERATOR_REDUCE_ROWS = 1
OUT_BLOCK = 64  # output channels dequantized at once by the CPU products (measured best of 32, 64, 128)
X_DIGITS = 3  # int8 digits per activation in the CPU int8 product: 22 bits of fixed point per row
CPU_DIGIT_ROWS = 8  # rows up to which the CPU int8 product multiplies x's digits (more: float32 blocks)


# --------------------------------------------------------------------------- layout helpers


def _out_axis(in_axis: int) -> int:
    if in_axis not in (0, 1):
        raise ValueError(f"in_axis must be 0 ([in, out]) or 1 ([out, in]), not {in_axis}")
    return 1 - in_axis


def _safe_scale(scale: jax.Array) -> jax.Array:
    """scale with zeros replaced by 1, to divide by (a zero scale's values are all zero)."""
    return jnp.where(scale == 0, 1.0, scale)


def _check_groups(n_in: int, group: int) -> int:
    """The number of groups of `n_in` inputs; `group` must be even and divide n_in."""
    if group <= 0 or group % 2 or n_in % group:
        raise ValueError(f"int4 groups of {group} inputs need an even group that divides the input size {n_in}")
    return n_in // group


# --------------------------------------------------------------------------- int8


def quantize_int8(w: jax.Array, in_axis: int) -> tuple[jax.Array, jax.Array]:
    """w [in, out] (in_axis 0) or [out, in] (in_axis 1) -> (q int8 of w's shape, scale [out] float32)."""
    _out_axis(in_axis)
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=in_axis) / INT8_MAX  # [out]
    q = jnp.round(w / jnp.expand_dims(_safe_scale(scale), in_axis))
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize_int8(q: jax.Array, scale: jax.Array, in_axis: int, dtype=jnp.float32) -> jax.Array:
    """(q int8 [in, out] or [out, in], scale [out]) -> the weight in `dtype`, q's layout."""
    _out_axis(in_axis)
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, in_axis)).astype(dtype)


# --------------------------------------------------------------------------- int4


def pack_int4(q: jax.Array, in_axis: int, group: int = GROUP) -> jax.Array:
    """q int8 values in [-8, 7], [in, out] or [out, in] -> int8 bytes with the input axis halved:
    within each group, byte j's low nibble is input j and its high nibble input j + group/2."""
    _out_axis(in_axis)
    n_groups = _check_groups(q.shape[in_axis], group)
    grouped = jnp.moveaxis(q, in_axis, -1).reshape(*q.shape[:in_axis], *q.shape[in_axis + 1:], n_groups, group)
    low, high = grouped[..., : group // 2], grouped[..., group // 2:]  # [..., groups, group/2]
    packed = jnp.bitwise_or(jnp.bitwise_and(low, 0xF), jnp.left_shift(high, 4)).astype(jnp.int8)
    return jnp.moveaxis(packed.reshape(*packed.shape[:-2], -1), -1, in_axis)


def unpack_int4(packed: jax.Array, in_axis: int, group: int = GROUP) -> jax.Array:
    """The inverse of `pack_int4`: int8 values in [-8, 7] with the input axis doubled."""
    _out_axis(in_axis)
    n_groups = _check_groups(2 * packed.shape[in_axis], group)
    rows = jnp.moveaxis(packed, in_axis, -1)
    grouped = rows.reshape(*rows.shape[:-1], n_groups, group // 2)  # [..., groups, group/2]
    low = jnp.right_shift(jnp.left_shift(grouped, 4), 4)  # arithmetic shifts sign-extend the nibble
    high = jnp.right_shift(grouped, 4)
    values = jnp.concatenate([low, high], axis=-1).reshape(*rows.shape[:-1], -1)  # [..., in]
    return jnp.moveaxis(values, -1, in_axis)


def quantize_int4(w: jax.Array, in_axis: int, group: int = GROUP) -> tuple[jax.Array, jax.Array]:
    """w [in, out] or [out, in] -> (packed int8 with the input axis halved (`pack_int4`),
    scale [in / group, out] float32)."""
    _out_axis(in_axis)
    w_in_out = jnp.asarray(w, jnp.float32) if in_axis == 0 else jnp.asarray(w, jnp.float32).T  # [in, out]
    n_in, n_out = w_in_out.shape
    grouped = w_in_out.reshape(_check_groups(n_in, group), group, n_out)  # [groups, group, out]
    scale = jnp.max(jnp.abs(grouped), axis=1) / INT4_MAX  # [groups, out]
    q = jnp.clip(jnp.round(grouped / _safe_scale(scale)[:, None, :]), -INT4_MAX, INT4_MAX).astype(jnp.int8)
    q = q.reshape(n_in, n_out)  # [in, out]
    return pack_int4(q if in_axis == 0 else q.T, in_axis, group), scale


def _dequantize_int4_values(q: jax.Array, scale: jax.Array, in_axis: int, dtype,
                            offset: jax.Array | None = None) -> jax.Array:
    """Unpacked q [in, out] or [out, in] (values) and scale (and offset) [groups, out] -> the weight in `dtype`:
    q * scale + offset."""
    n_groups = scale.shape[0]
    per_group = (lambda a: a[:, None, :]) if in_axis == 0 else (lambda a: a.T[:, :, None])
    if in_axis == 0:
        grouped = q.reshape(n_groups, -1, q.shape[1]).astype(jnp.float32)  # [groups, group, out]
    else:
        grouped = q.reshape(q.shape[0], n_groups, -1).astype(jnp.float32)  # [out, groups, group]
    grouped = grouped * per_group(scale)
    if offset is not None:
        grouped = grouped + per_group(offset)
    return grouped.reshape(q.shape).astype(dtype)


def dequantize_int4(packed: jax.Array, scale: jax.Array, in_axis: int, dtype=jnp.float32,
                    offset: jax.Array | None = None) -> jax.Array:
    """(packed [in/2, out] or [out, in/2], scale [groups, out], optional offset [groups, out]) -> the
    weight q * scale (+ offset) in `dtype`, unpacked layout."""
    group = 2 * packed.shape[in_axis] // scale.shape[0]
    return _dequantize_int4_values(unpack_int4(packed, in_axis, group), scale, in_axis, dtype, offset)


# --------------------------------------------------------------------------- products


def _block_size(n: int, target: int) -> int:
    """The largest divisor of n that is at most target."""
    return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _blocked_product(x: jax.Array, q: jax.Array, in_axis: int, to_float: Callable[..., jax.Array], block: int,
                     scale: jax.Array | None = None) -> jax.Array:
    """x [rows, in] times a quantized weight, one block at a time, float32 [rows, out].

    `to_float(q_block)`, or `to_float(q_block, scale_block)` when `scale` is given, turns one
    block of q (blocks along q's axis 0) into a float block of the weight in q's layout; the
    scales are blocked along their last axis for [out, in] and along axis 0 for [in, out].
    [out, in]: blocks of output channels, results concatenated. [in, out]: blocks of input
    rows, results summed. Each block's dot takes the block in x's dtype, with a float32 result.
    """
    n_blocks = q.shape[0] // block
    q_blocks = q.reshape(n_blocks, block, *q.shape[1:])
    if in_axis == 1:
        blocks = (q_blocks,) if scale is None else \
            (q_blocks, jnp.moveaxis(scale.reshape(*scale.shape[:-1], n_blocks, -1), -2, 0))  # [blocks, ..., block]

        def out_block(args):
            w = to_float(*args).astype(x.dtype)  # [block, in]
            return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        y = jax.lax.map(out_block, blocks)  # [blocks, rows, block]
        return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], -1)  # [rows, out]

    x_blocks = jnp.moveaxis(x.reshape(x.shape[0], n_blocks, -1), 1, 0)  # [blocks, rows, in/blocks]
    blocks = (x_blocks, q_blocks) if scale is None else \
        (x_blocks, q_blocks, scale.reshape(n_blocks, -1, *scale.shape[1:]))

    def in_block(total, args):
        x_block, *weight_block = args
        w = to_float(*weight_block).astype(x.dtype)  # [in/blocks, out]
        return total + jax.lax.dot_general(x_block, w, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32), None

    total = jnp.zeros((x.shape[0], q.shape[1]), jnp.float32)
    return jax.lax.scan(in_block, total, blocks)[0]


def _flat_product(x: jax.Array, product: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """product over x [..., in] flattened to [rows, in]; the result [..., out] float32."""
    lead = x.shape[:-1]
    y = product(x.reshape(math.prod(lead), x.shape[-1]))  # [rows, out]
    return y.reshape(*lead, y.shape[-1])


def _compute_dtype(x: jax.Array):
    return x.dtype if x.dtype in (jnp.float32, jnp.bfloat16) else jnp.float32


def _dequantize_then_dot(x: jax.Array, q: jax.Array, scale: jax.Array, w_in_axis: int,
                         dequantize: Callable) -> jax.Array:
    """x [..., in] times the whole weight dequantized in x's dtype: float32 [..., out] (accelerators)."""
    dims = (((1,), (w_in_axis,)), ((), ()))
    return _flat_product(x, lambda x2: jax.lax.dot_general(
        x2, dequantize(q, scale, w_in_axis, x.dtype), dims, preferred_element_type=jnp.float32))


def _int8_accelerator_product(x: jax.Array, q: jax.Array, scale: jax.Array, in_axis: int) -> jax.Array:
    """x [rows, in] times the int8 weight off the CPU: float32 [rows, out]. Up to
    ACCELERATOR_REDUCE_ROWS rows of a [out, in] weight, a multiply-reduce (one fusion that
    reads q once as int8); otherwise q converted to x's dtype (exact) in the dot. The scale
    follows either (it is constant along the contraction)."""
    if in_axis == 1 and x.shape[0] <= ACCELERATOR_REDUCE_ROWS:
        y = jnp.sum(x.astype(jnp.float32)[:, None, :] * q.astype(jnp.float32)[None], axis=-1)  # [rows, out]
    else:
        y = jax.lax.dot_general(x, q.astype(x.dtype), (((1,), (in_axis,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return y * scale


def _int4_accelerator_reduce(x: jax.Array, packed: jax.Array, scale: jax.Array,
                             offset: jax.Array | None) -> jax.Array:
    """x [rows, in] times the packed int4 weight [out, in/2] as a multiply-reduce: float32 [rows, out].
    Each group's low nibbles multiply the group's first half of x and its high nibbles the
    second (pack_int4's order), so nothing is unpacked into a new array; the per-group sums are
    scaled, and the offsets add sum(x over the group) * offset."""
    groups = scale.shape[0]
    half = packed.shape[1] // groups
    nibbles = packed.reshape(packed.shape[0], groups, half)  # [out, groups, group/2]
    low = jnp.right_shift(jnp.left_shift(nibbles, 4), 4).astype(jnp.float32)
    high = jnp.right_shift(nibbles, 4).astype(jnp.float32)
    xg = x.astype(jnp.float32).reshape(x.shape[0], groups, 2 * half)  # [rows, groups, group]
    per_group = (jnp.sum(xg[:, None, :, :half] * low[None], axis=-1)
                 + jnp.sum(xg[:, None, :, half:] * high[None], axis=-1))  # [rows, out, groups]
    y = jnp.sum(per_group * scale.T[None], axis=-1)  # [rows, out]
    if offset is not None:
        y = y + jnp.sum(xg, axis=-1) @ offset  # [rows, groups] @ [groups, out]
    return y


def _quantized_product(x: jax.Array, q: jax.Array, scale: jax.Array, w_in_axis: int, dequantize: Callable,
                       rows_per_block: int) -> jax.Array:
    """x [..., in] times a quantized weight q with its scales: float32 [..., out].
    dequantize(q, scale, in_axis, dtype): the float weight, whole or one block of q's axis 0 with its
    scales. On CPU blocked (`_blocked_product`, `rows_per_block` rows of q at a time, each block
    dequantized with its scales), elsewhere dequantize-then-dot (int4 of more than
    ACCELERATOR_REDUCE_ROWS rows)."""
    x = x.astype(_compute_dtype(x))
    if jax.default_backend() != "cpu":
        return _dequantize_then_dot(x, q, scale, w_in_axis, dequantize)
    block_dequantize = lambda q_block, s_block: dequantize(q_block, s_block, w_in_axis)  # noqa: E731
    return _flat_product(x, lambda x2: _blocked_product(x2, q, w_in_axis, block_dequantize, rows_per_block, scale))


# --------------------------------------------------------------------------- int8 products on CPU


def _int8_digits(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 x [rows, in] -> (digits int8 [X_DIGITS, rows, in], step [rows, 1] float32) with
    x = step * sum_k digits[k] * 256^k to within step / 2: each row in fixed point, its step the
    power of two at which the row's largest |x| is at least 2^(8 X_DIGITS - 3) steps and under
    2^(8 X_DIGITS - 2) (so x / step is exact), split into base-256 digits in [-128, 127] (the
    last in [-64, 64]).
    A row with a NaN or an infinity gets a NaN step, so the product's row is NaN."""
    bits = 8 * X_DIGITS - 2
    peak = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [rows, 1]
    _, exponent = jnp.frexp(peak)  # 2^(exponent - 1) <= peak < 2^exponent
    step = jnp.where(jnp.isfinite(peak), jnp.ldexp(jnp.ones_like(peak), exponent - bits), jnp.nan)  # [rows, 1]
    fixed = jnp.round(jnp.nan_to_num(x / step)).astype(jnp.int32)  # [rows, in], |fixed| <= 2^bits
    digits = []
    for _ in range(X_DIGITS - 1):
        digit = ((fixed + 128) & 255) - 128  # [rows, in] in [-128, 127]
        digits.append(digit)
        fixed = (fixed - digit) >> 8  # exact: fixed - digit is a multiple of 256
    digits.append(fixed)
    return jnp.stack(digits).astype(jnp.int8), step


def _int8_digit_product(x: jax.Array, q: jax.Array, in_axis: int) -> jax.Array:
    """float32 x [rows, in] times the integers of q (unscaled): float32 [rows, out]. x's int8 digits
    (`_int8_digits`) times q in one int8 x int8 -> int32 dot (exact), the digits' products
    recombined in float32 and scaled by each row's step."""
    digits, step = _int8_digits(x)  # [X_DIGITS, rows, in], [rows, 1]
    rows = x.shape[0]
    dims = (((1,), (in_axis,)), ((), ()))
    partial = jax.lax.dot_general(digits.reshape(X_DIGITS * rows, -1), q, dims, preferred_element_type=jnp.int32)
    partial = partial.astype(jnp.float32).reshape(X_DIGITS, rows, -1)  # [X_DIGITS, rows, out]
    total = partial[-1]
    for k in reversed(range(X_DIGITS - 1)):
        total = total * 256.0 + partial[k]
    return total * step  # [rows, out]


def _int8_cpu_product(x: jax.Array, q: jax.Array, scale: jax.Array, in_axis: int, block: int) -> jax.Array:
    """float32 x [rows, in] times the int8 weight on CPU: float32 [rows, out].

    The dots multiply by the integers of q, and the per-channel scale multiplies their result
    (exact: the scale is constant along the contraction):
    - up to CPU_DIGIT_ROWS rows of a [out, in] weight: x's int8 digits (`_int8_digit_product`),
      an integer dot that reads q as it is stored (x to within 2^-(8 X_DIGITS - 2) of its
      row's largest value, about float32's own rounding of the product's sum);
    - more rows, a [in, out] weight (XLA's integer dot contracting its dim 0 measured slower
      than the float32 blocks at 8 rows), or an input too long for int32 sums of digit
      products: blocks of `block` rows of q converted to float32 (exact), float32 dots.
    """
    int32_safe = q.shape[in_axis] * 128 * INT8_MAX < 2 ** 31
    if in_axis == 1 and x.shape[0] <= CPU_DIGIT_ROWS and int32_safe:
        y = _int8_digit_product(x, q, in_axis)
    else:
        y = _blocked_product(x, q, in_axis, lambda q_block: q_block.astype(jnp.float32), block)
    return y * scale  # [rows, out]


def int8_product(x: jax.Array, q: jax.Array, scale: jax.Array, w_in_axis: int,
                 block: int = OUT_BLOCK) -> jax.Array:
    """x [..., in] (float32 or bfloat16) times the int8 weight (q [in, out] or [out, in], scale [out]):
    float32 [..., out]. On CPU (`_int8_cpu_product`) x in float32 (a bfloat16 x exactly) and the
    scale applied after integer or blocked float32 dots, `block` output channels (input rows
    for [in, out], 4 times as many) at a time; elsewhere `_int8_accelerator_product`."""
    _out_axis(w_in_axis)
    x = x.astype(_compute_dtype(x))
    if jax.default_backend() != "cpu":
        return _flat_product(x, lambda x2: _int8_accelerator_product(x2, q, scale, w_in_axis))
    # [in, out]: a block of input rows reaches every output channel, so its blocks are longer
    rows_per_block = _block_size(q.shape[0], block if w_in_axis == 1 else block * 4)
    return _flat_product(x.astype(jnp.float32),
                         lambda x2: _int8_cpu_product(x2, q, scale, w_in_axis, rows_per_block))


def int4_product(x: jax.Array, packed: jax.Array, scale: jax.Array, w_in_axis: int,
                 block: int = OUT_BLOCK, offset: jax.Array | None = None) -> jax.Array:
    """x [..., in] (float32 or bfloat16) times the packed int4 weight (packed [in/2, out] or
    [out, in/2], scale and optional offset [in / group, out]): float32 [..., out]. Blocked on CPU,
    as `int8_product`; a [in, out] weight is walked one group of input rows (group/2 packed rows)
    at a time. Off the CPU, a multiply-reduce up to ACCELERATOR_REDUCE_ROWS rows of a [out, in/2]
    weight (`_int4_accelerator_reduce`), else dequantize-then-dot."""
    _out_axis(w_in_axis)
    rows = math.prod(x.shape[:-1])
    if jax.default_backend() != "cpu" and w_in_axis == 1 and rows <= ACCELERATOR_REDUCE_ROWS:
        return _flat_product(x, lambda x2: _int4_accelerator_reduce(x2, packed, scale, offset))
    group = 2 * packed.shape[w_in_axis] // scale.shape[0]
    # [in, out]: one group per block, so scale [groups, out] splits into [1, out] per block
    rows_per_block = _block_size(packed.shape[0], block) if w_in_axis == 1 else group // 2
    if offset is None:
        return _quantized_product(x, packed, scale, w_in_axis, dequantize_int4, rows_per_block)
    # the offset rides along with the scale: both are [groups, out], blocked alike
    both = jnp.stack([scale, offset], axis=1)  # [groups, 2, out]
    dequantize = lambda q, s, in_axis, dtype=jnp.float32: dequantize_int4(  # noqa: E731
        q, s[:, 0], in_axis, dtype, s[:, 1])
    return _quantized_product(x, packed, both, w_in_axis, dequantize, rows_per_block)


def quantize_projection(w: jax.Array, in_axis: int, quantization: P.Quantization) -> dict[str, jax.Array]:
    """A float projection weight, [in, out] (in_axis 0) or [out, in] (in_axis 1), as the leaves of
    `quantization` (params.Quantization: {qvalue, scale}, [out, in] like PyTorch's weight)."""
    w_out_in = jnp.asarray(w).T if _out_axis(in_axis) == 1 else jnp.asarray(w)  # [out, in]
    if quantization.offsets:
        raise ValueError("the project's own quantization is symmetric: offsets come only from GPTQ/AWQ checkpoints")
    if quantization.kind == "int8":
        q, scale = quantize_int8(w_out_in, 1)
    else:
        q, scale = quantize_int4(w_out_in, 1, quantization.group)
    return {P.QVALUE: q, P.SCALE: scale}


def _leaf_shardings(float_leaf: jax.Array, in_axis: int, quantization: P.Quantization) -> dict:
    """Where the quantized leaves of `float_leaf` go: its devices, the mesh axis of its output dim on
    the output dim of qvalue and the scales (int4's group axis replicated)."""
    sharding = float_leaf.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return {name: sharding for name in (P.QVALUE, P.SCALE)}
    spec = (*sharding.spec, *(None,) * (2 - len(sharding.spec)))
    in_mesh, out_mesh = spec[in_axis], spec[1 - in_axis]
    named = lambda *axes: jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*axes))  # noqa: E731
    return {P.QVALUE: named(out_mesh, in_mesh),
            P.SCALE: named(out_mesh) if quantization.kind == "int8" else named(None, out_mesh)}


def quantize_params(params: dict, quantization: P.Quantization) -> dict:
    """Replaces, in place, every float projection of `params` (either layout) that `quantization`
    covers by its quantized leaves, placed on the float leaf's devices with its output axis's
    sharding; returns `params`. One projection at a time, its float leaf dropped before the next,
    so memory peaks at one float leaf above the tree."""
    for path in [path for path, _ in P.flatten(params)]:  # paths only: a list of leaves would keep them all
        quantize_leaf(params, path, quantization)
    return params


def quantize_leaf(params: dict, path: P.PathT, quantization: P.Quantization) -> None:
    """Replaces the leaf at `path` by its quantized leaves when it is a float projection that
    `quantization` covers (see `quantize_params`); leaves anything else alone."""
    if path[-1] not in P.LAYOUTS or not quantization.covers(path):
        return
    parent = P.get_path(params, path[:-1])
    leaf = parent.pop(path[-1])
    in_axis = 0 if path[-1] == P.KERNEL else 1
    shardings = _leaf_shardings(leaf, in_axis, quantization)
    parent.update(_compiled_quantize(in_axis, quantization, tuple(shardings.items()))(leaf))


@functools.lru_cache(maxsize=None)
def _compiled_quantize(in_axis: int, quantization: P.Quantization, shardings: tuple) -> Callable:
    return jax.jit(lambda w: quantize_projection(w, in_axis, quantization), out_shardings=dict(shardings))


def quantized_bytes(shape: tuple[int, int], kind: str, group: int = GROUP) -> int:
    """Bytes of a quantized [in, out] weight with its float32 scales ("int8" or "int4")."""
    n_in, n_out = shape
    if kind == "int8":
        return n_in * n_out + 4 * n_out
    if kind == "int4":
        return n_in * n_out // 2 + 4 * (n_in // group) * n_out
    raise ValueError(f"unknown quantization {kind!r}: expected int8 or int4")


__all__ = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "pack_int4", "unpack_int4",
           "int8_product", "int4_product", "quantize_projection", "quantize_params", "quantize_leaf",
           "quantized_bytes", "GROUP", "OUT_BLOCK"]
