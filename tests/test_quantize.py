"""bluelm_jax.quantize: int8 and group-wise int4 round trips, zero channels, and the products
against x @ dequantize(...) in both layouts, on tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bluelm_jax import quantize as Q

IN, OUT, GROUP = 256, 96, 64


def weight(seed=0, in_axis=0):
    w = np.random.default_rng(seed).standard_normal((IN, OUT)).astype(np.float32)  # [in, out]
    return w if in_axis == 0 else w.T.copy()


@pytest.mark.parametrize("in_axis", [0, 1])
def test_int8_round_trip_within_half_a_step(in_axis):
    w = weight(1, in_axis)
    q, scale = Q.quantize_int8(w, in_axis)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (OUT,)
    np.testing.assert_allclose(np.asarray(scale), np.abs(w).max(axis=in_axis) / 127, rtol=1e-6)
    error = np.abs(np.asarray(Q.dequantize_int8(q, scale, in_axis)) - w)
    assert (error <= np.expand_dims(np.asarray(scale), in_axis) / 2 * (1 + 1e-5)).all()
    assert np.abs(np.asarray(q)).max() == 127  # the largest value of each channel maps to 127


@pytest.mark.parametrize("in_axis", [0, 1])
def test_int4_round_trip_within_half_a_step_of_its_group(in_axis):
    w = weight(2, in_axis)
    packed, scale = Q.quantize_int4(w, in_axis, GROUP)
    assert packed.dtype == jnp.int8 and packed.shape[in_axis] == IN // 2 and scale.shape == (IN // GROUP, OUT)
    w_in_out = w if in_axis == 0 else w.T
    expected_scale = np.abs(w_in_out.reshape(IN // GROUP, GROUP, OUT)).max(axis=1) / 7
    np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=1e-6)
    back = np.asarray(Q.dequantize_int4(packed, scale, in_axis))
    back_in_out = back if in_axis == 0 else back.T
    step = np.repeat(np.asarray(scale), GROUP, axis=0)  # [in, out]
    assert (np.abs(back_in_out - w_in_out) <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("in_axis", [0, 1])
def test_int4_packing_round_trip_and_nibble_order(in_axis):
    values = np.random.default_rng(3).integers(-8, 8, (IN, OUT)).astype(np.int8)  # [in, out]
    values = values if in_axis == 0 else values.T.copy()
    packed = np.asarray(Q.pack_int4(values, in_axis, GROUP))
    np.testing.assert_array_equal(np.asarray(Q.unpack_int4(packed, in_axis, GROUP)), values)
    first = packed.take(0, axis=1 - in_axis).view(np.uint8)  # output channel 0: [in/2] bytes
    column = [int(v) & 0xF for v in values.take(0, axis=1 - in_axis)]  # [in] nibbles
    assert first[0] == column[0] | column[GROUP // 2] << 4
    assert first[GROUP // 2] == column[GROUP] | column[GROUP + GROUP // 2] << 4


@pytest.mark.parametrize("in_axis", [0, 1])
def test_zero_channels_and_groups_give_zero_scales_and_no_nan(in_axis):
    w = weight(4, 0)
    w[:, 5] = 0.0  # a whole output channel
    w[GROUP:2 * GROUP, 7] = 0.0  # one group of another channel
    w = w if in_axis == 0 else w.T.copy()
    q8, s8 = Q.quantize_int8(w, in_axis)
    q4, s4 = Q.quantize_int4(w, in_axis, GROUP)
    assert s8[5] == 0 and s4[1, 7] == 0 and s4[0, 5] == 0
    for back in (Q.dequantize_int8(q8, s8, in_axis), Q.dequantize_int4(q4, s4, in_axis)):
        back = np.asarray(back)
        assert np.isfinite(back).all()
        assert (back.take(5, axis=1 - in_axis) == 0).all()


def test_bad_groups_and_axes_are_refused():
    with pytest.raises(ValueError, match="divides the input size"):
        Q.quantize_int4(np.ones((100, 8), np.float32), 0, 64)
    with pytest.raises(ValueError, match="in_axis"):
        Q.quantize_int8(np.ones((8, 8), np.float32), 2)


@pytest.mark.parametrize("in_axis", [0, 1])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_products_equal_x_times_the_dequantized_weight(kind, lead, in_axis):
    w = weight(5, in_axis)
    x = np.random.default_rng(6).standard_normal((*lead, IN)).astype(np.float32)
    if kind == "int8":
        q, scale = Q.quantize_int8(w, in_axis)
        dense = np.asarray(Q.dequantize_int8(q, scale, in_axis))
        y = Q.int8_product(x, q, scale, in_axis, block=32)  # several blocks of 32 output channels
    else:
        q, scale = Q.quantize_int4(w, in_axis, GROUP)
        dense = np.asarray(Q.dequantize_int4(q, scale, in_axis))
        y = Q.int4_product(x, q, scale, in_axis, block=32)
    expected = x @ (dense if in_axis == 0 else dense.T)  # [..., out]
    assert y.dtype == jnp.float32 and y.shape == (*lead, OUT)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4)


def test_quantized_bytes():
    assert Q.quantized_bytes((4096, 11008), "int8") == 4096 * 11008 + 4 * 11008
    assert Q.quantized_bytes((4096, 11008), "int4") == 4096 * 11008 // 2 + 4 * 32 * 11008


@pytest.mark.parametrize("in_axis", [0, 1])
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_product_has_float32_accuracy_at_every_row_count(dtype, rows, in_axis):
    """Each row count's formulation (x's int8 digits up to 8 rows, float32 blocks beyond) equals
    x @ dequantize(q) to float32 accuracy: neither x nor the weight is rounded to 8 bits."""
    w = weight(7, in_axis)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((rows, IN)), dtype)
    q, scale = Q.quantize_int8(w, in_axis)
    dense = np.asarray(Q.dequantize_int8(q, scale, in_axis)).astype(np.float64)
    x64 = np.asarray(x.astype(jnp.float32)).astype(np.float64)
    expected = x64 @ (dense if in_axis == 0 else dense.T)  # [rows, out]
    y = Q.int8_product(x, q, scale, in_axis, block=4)  # several float32 blocks
    assert y.dtype == jnp.float32 and y.shape == (rows, OUT)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)


def test_int8_digits_rebuild_each_row_within_half_a_step():
    x = np.random.default_rng(11).standard_normal((4, IN)).astype(np.float32)
    x[1] *= 1e4  # rows of different sizes, a zero row, and a row with one large value
    x[2] = 0.0
    x[3, 5] = 256.0  # a power of two: exactly 2^(8 digits - 3) steps
    digits, step = Q._int8_digits(jnp.asarray(x))
    assert digits.dtype == jnp.int8 and digits.shape == (Q.X_DIGITS, 4, IN) and step.shape == (4, 1)
    rebuilt = sum(np.asarray(digits[k]).astype(np.float64) * 256.0 ** k for k in range(Q.X_DIGITS))
    step = np.asarray(step).astype(np.float64)
    assert (np.abs(rebuilt * step - x) <= step / 2).all()
    # a power of two at which the row's largest value is 2^(8 digits - 3) steps or more, under 2^(8 digits - 2)
    steps_at_peak = np.abs(x[[0, 1, 3]]).max(axis=1) / step[[0, 1, 3], 0]  # the nonzero rows
    assert (np.log2(step) == np.round(np.log2(step))).all()
    bits = 8 * Q.X_DIGITS - 2
    assert ((steps_at_peak < 2.0 ** bits) & (steps_at_peak >= 2.0 ** (bits - 1))).all()
    assert steps_at_peak[2] == 2.0 ** (bits - 1)
    assert (np.asarray(digits[-1]) != 0).any()  # the top digit carries the largest values


def test_int8_product_of_a_nan_row_is_nan():
    q, scale = Q.quantize_int8(weight(12, 1), 1)
    x = np.random.default_rng(13).standard_normal((2, IN)).astype(np.float32)
    x[1, 3] = np.nan
    y = np.asarray(Q.int8_product(x, q, scale, 1))
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_accelerator_products_equal_dequantize_then_dot(rows):
    """The products used off the CPU (multiply-reduces up to ACCELERATOR_REDUCE_ROWS rows, else
    converted dots), run here on CPU: equal to dequantizing the weight and multiplying."""
    key_w, key_x, key_o = jax.random.split(jax.random.key(7), 3)
    w = 0.05 * jax.random.normal(key_w, (96, 256), jnp.float32)  # [out, in]
    x = jax.random.normal(key_x, (rows, 256), jnp.float32)
    q8, s8 = Q.quantize_int8(w, 1)
    expected = x @ Q.dequantize_int8(q8, s8, 1).T
    np.testing.assert_allclose(Q._int8_accelerator_product(x, q8, s8, 1), expected, rtol=1e-5, atol=1e-5)
    q4, s4 = Q.quantize_int4(w, 1, 64)
    offset = 0.01 * jax.random.normal(key_o, s4.shape, jnp.float32)
    for off in (None, offset):
        expected = x @ Q.dequantize_int4(q4, s4, 1, jnp.float32, off).T
        np.testing.assert_allclose(Q._int4_accelerator_reduce(x, q4, s4, off), expected, rtol=1e-5, atol=1e-5)
