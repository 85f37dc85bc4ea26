"""GPTQ and AWQ packed 4-bit tensors: bit positions written out by hand, exact round trips from
known integers, act_order's unsorted g_idx, dequantization against a loop written independently,
and the quantization_config errors."""

import numpy as np
import pytest

from bluelm_jax import packed_int4 as p4


def as_int32_words(hex_words):
    """Hand-written 32-bit words (a nested list) as the int32 values a checkpoint stores."""
    return np.array(hex_words, dtype=np.uint32).view(np.int32)


def random_nibbles(rng, shape):
    return rng.integers(0, 16, size=shape, dtype=np.int64)


# ------------------------------------------------------------------ hand-computed bit positions


def test_gptq_qweight_packs_input_rows_from_the_low_nibble():
    # q[:, 0] = 1..8 down the input axis: row 8r + k sits in nibble k of word [r, 0].
    # q[:, 1] = 15 in row 0 only.
    q = np.zeros((8, 2), dtype=np.int64)  # [in, out]
    q[:, 0] = np.arange(1, 9)
    q[0, 1] = 15
    expected = as_int32_words([[0x87654321, 0x0000000F]])  # [in/8, out]
    np.testing.assert_array_equal(p4.pack_gptq_qweight(q), expected)
    np.testing.assert_array_equal(p4.unpack_gptq_qweight(expected), q)


def test_gptq_qzeros_store_the_zero_point_minus_one_along_the_output_axis():
    zeros = np.arange(1, 9)[None, :]  # [groups=1, out=8]: zero points 1..8
    expected = as_int32_words([0x76543210])[None, :]  # [1, out/8]
    np.testing.assert_array_equal(p4.pack_gptq_qzeros(zeros), expected)
    np.testing.assert_array_equal(p4.unpack_gptq_qzeros(expected), zeros)
    # A symmetric checkpoint's zero point 8 is stored as 7 in every nibble.
    np.testing.assert_array_equal(p4.unpack_gptq_qzeros(as_int32_words([0x77777777])[None, :]), np.full((1, 8), 8))
    # checkpoint_format "gptq_v2" stores the zero point itself.
    np.testing.assert_array_equal(p4.pack_gptq_qzeros(zeros - 1, zero_offset=0), expected)
    np.testing.assert_array_equal(p4.unpack_gptq_qzeros(expected, zero_offset=0), zeros - 1)


def test_awq_packs_columns_in_the_interleaved_order():
    # Columns 0..7 holding the values 0..7: nibbles 0..7 hold columns 0, 2, 4, 6, 1, 3, 5, 7.
    row = np.arange(8)[None, :]  # [rows=1, out=8]
    expected = as_int32_words([0x75316420])[None, :]  # [1, out/8]
    np.testing.assert_array_equal(p4.pack_awq_qweight(row), expected)
    np.testing.assert_array_equal(p4.pack_awq_qzeros(row), expected)
    np.testing.assert_array_equal(p4.unpack_awq_qweight(expected), row)
    np.testing.assert_array_equal(p4.unpack_awq_qzeros(expected), row)
    # The second word of a row holds columns 8..15 in the same order.
    two_words = np.concatenate([np.zeros(8, dtype=np.int64), np.arange(8, 16)])[None, :]  # [1, 16]
    np.testing.assert_array_equal(p4.pack_awq_qweight(two_words), as_int32_words([0, 0xFDB9ECA8])[None, :])


# ------------------------------------------------------------------ round trips of known integers


def test_gptq_round_trips_known_integers():
    rng = np.random.default_rng(0)
    q = random_nibbles(rng, (64, 24))  # [in, out]
    zeros = rng.integers(1, 17, size=(4, 24))  # [groups, out], classic format: 1..16
    qweight = p4.pack_gptq_qweight(q)
    qzeros = p4.pack_gptq_qzeros(zeros)
    assert qweight.shape == (8, 24) and qweight.dtype == np.int32
    assert qzeros.shape == (4, 3) and qzeros.dtype == np.int32
    assert (qweight < 0).any(), "nibble 7 at 8 or more must give negative int32 words"
    np.testing.assert_array_equal(p4.unpack_gptq_qweight(qweight), q)
    np.testing.assert_array_equal(p4.unpack_gptq_qzeros(qzeros), zeros)


def test_awq_round_trips_known_integers():
    rng = np.random.default_rng(1)
    q = random_nibbles(rng, (64, 24))  # [in, out]
    zeros = random_nibbles(rng, (2, 24))  # [groups, out]
    qweight = p4.pack_awq_qweight(q)
    qzeros = p4.pack_awq_qzeros(zeros)
    assert qweight.shape == (64, 3) and qzeros.shape == (2, 3)
    np.testing.assert_array_equal(p4.unpack_awq_qweight(qweight), q)
    np.testing.assert_array_equal(p4.unpack_awq_qzeros(qzeros), zeros)


def test_packers_refuse_values_that_do_not_fit():
    with pytest.raises(ValueError, match="0..15"):
        p4.pack_gptq_qweight(np.full((8, 1), 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        p4.pack_awq_qweight(np.zeros((1, 12), dtype=np.int64))
    # The classic GPTQ format cannot hold a zero point of 0 (it would store -1).
    with pytest.raises(ValueError, match="zero points must lie in 1..16"):
        p4.pack_gptq_qzeros(np.zeros((1, 8), dtype=np.int64))


# ------------------------------------------------------------------ dequantization


def loop_dequantize(q, zeros, scales, group_of_row):
    """w[i, o] = (q[i, o] - zero[g, o]) * scale[g, o] with g = group_of_row[i], one entry at a time."""
    weight = np.empty(q.shape, dtype=np.float32)
    for i in range(q.shape[0]):
        g = group_of_row[i]
        for o in range(q.shape[1]):
            weight[i, o] = np.float32(q[i, o] - zeros[g, o]) * np.float32(scales[g, o])
    return weight


def test_gptq_dequantizes_with_an_act_order_g_idx():
    rng = np.random.default_rng(2)
    in_features, out_features, group_size = 64, 16, 16
    groups = in_features // group_size
    q = random_nibbles(rng, (in_features, out_features))
    zeros = rng.integers(1, 17, size=(groups, out_features))
    scales = rng.uniform(0.01, 0.1, size=(groups, out_features)).astype(np.float16)
    g_idx = rng.permutation(p4.default_g_idx(in_features, group_size))  # act_order: unsorted
    assert (np.diff(g_idx) < 0).any()
    packed = (p4.pack_gptq_qweight(q), p4.pack_gptq_qzeros(zeros), scales)

    weight = p4.dequantize_gptq(*packed, g_idx)
    np.testing.assert_array_equal(weight, loop_dequantize(q, zeros, scales, g_idx))
    assert weight.dtype == np.float32 and weight.shape == (in_features, out_features)
    # The g_idx matters: the default grouping gives other values.
    assert not np.array_equal(weight, p4.dequantize_gptq(*packed, None, group_size=group_size))


def test_gptq_default_g_idx_and_the_v2_zero_offset():
    rng = np.random.default_rng(3)
    q = random_nibbles(rng, (32, 8))
    zeros = random_nibbles(rng, (2, 8))  # gptq_v2: 0..15 stored as they are
    scales = rng.uniform(0.01, 0.1, size=(2, 8)).astype(np.float16)
    weight = p4.dequantize_gptq(
        p4.pack_gptq_qweight(q), p4.pack_gptq_qzeros(zeros, zero_offset=0), scales, group_size=16, zero_offset=0
    )
    np.testing.assert_array_equal(weight, loop_dequantize(q, zeros, scales, np.arange(32) // 16))


def test_awq_dequantizes_with_row_groups():
    rng = np.random.default_rng(4)
    q = random_nibbles(rng, (48, 16))
    zeros = random_nibbles(rng, (3, 16))
    scales = rng.uniform(0.01, 0.1, size=(3, 16)).astype(np.float16)
    weight = p4.dequantize_awq(p4.pack_awq_qweight(q), p4.pack_awq_qzeros(zeros), scales, group_size=16)
    np.testing.assert_array_equal(weight, loop_dequantize(q, zeros, scales, np.arange(48) // 16))
    assert weight.dtype == np.float32


def test_dequantize_linear_follows_the_config_and_gives_the_pytorch_layout():
    rng = np.random.default_rng(5)
    q = random_nibbles(rng, (32, 8))
    zeros = rng.integers(1, 16, size=(1, 8))
    scales = rng.uniform(0.01, 0.1, size=(1, 8)).astype(np.float16)
    gptq = p4.read_quantization_config({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}})
    awq = p4.read_quantization_config({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32}})
    expected = loop_dequantize(q, zeros, scales, np.zeros(32, dtype=np.int64))  # [in, out]

    gptq_packed = (p4.pack_gptq_qweight(q), p4.pack_gptq_qzeros(zeros), scales)
    np.testing.assert_array_equal(p4.dequantize_linear(gptq, *gptq_packed), expected)
    out_in = p4.dequantize_linear(gptq, *gptq_packed, out_in=True)
    np.testing.assert_array_equal(out_in, expected.T)
    assert out_in.flags["C_CONTIGUOUS"]
    awq_packed = (p4.pack_awq_qweight(q), p4.pack_awq_qzeros(zeros), scales)
    np.testing.assert_array_equal(p4.dequantize_linear(awq, *awq_packed), expected)


def test_mismatched_tensors_are_refused():
    q = np.zeros((16, 8), dtype=np.int64)
    qweight, qzeros = p4.pack_gptq_qweight(q), p4.pack_gptq_qzeros(np.ones((2, 8), dtype=np.int64))
    scales = np.ones((2, 8), dtype=np.float16)
    with pytest.raises(ValueError, match="g_idx has shape"):
        p4.dequantize_gptq(qweight, qzeros, scales, np.zeros(8, dtype=np.int32))
    with pytest.raises(ValueError, match="outside the 2 groups"):
        p4.dequantize_gptq(qweight, qzeros, scales, np.full(16, 2, dtype=np.int32))
    with pytest.raises(ValueError, match="disagree"):
        p4.dequantize_gptq(qweight, qzeros, np.ones((3, 8), dtype=np.float16), group_size=8)
    with pytest.raises(ValueError, match="need 4 groups"):
        awq_zeros = p4.pack_awq_qzeros(np.zeros((2, 8), dtype=np.int64))
        p4.dequantize_awq(p4.pack_awq_qweight(q), awq_zeros, scales, group_size=4)


# ------------------------------------------------------------------ quantization_config


def test_reads_the_release_configs():
    assert p4.read_quantization_config({"hidden_size": 64}) is None
    gptq = p4.read_quantization_config(
        {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}}
    )
    assert gptq == p4.QuantizationConfig("gptq", 4, 128, desc_act=True, zero_point=False, version="gptq")
    assert gptq.gptq_zero_offset == 1
    v2 = p4.read_quantization_config(
        {"quantization_config": {"quant_method": "gptq", "bits": 4, "sym": False, "checkpoint_format": "gptq_v2"}}
    )
    assert v2.zero_point and v2.gptq_zero_offset == 0
    awq = p4.read_quantization_config(
        {
            "quantization_config": {
                "quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMM", "zero_point": True
            }
        }
    )
    assert awq == p4.QuantizationConfig("awq", 4, 128, desc_act=False, zero_point=True, version="gemm")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"quant_method": "gptq", "bits": 8}, r"quantization_config\.bits=8 is not supported"),
        ({"quant_method": "bitsandbytes", "bits": 4}, r"quantization_config\.quant_method='bitsandbytes'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"quantization_config\.version='gemv'"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, r"quantization_config\.zero_point=False"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, r"checkpoint_format='marlin'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, r"quantization_config\.group_size=0"),
    ],
)
def test_unsupported_configs_name_the_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        p4.read_quantization_config({"quantization_config": fields})
