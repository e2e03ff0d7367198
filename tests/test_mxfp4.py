"""MXFP4 reference (spec §3): tables, both dequantizations, HF -> GGUF repack, llama.cpp's quantizer."""

import struct

import numpy as np
import pytest

from ossrt.format import mxfp4


def f32_bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def test_tables_match_spec():
    assert mxfp4.FP4_VALUES.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6]
    assert mxfp4.KVALUES.tolist() == [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]
    np.testing.assert_array_equal(mxfp4.KVALUES / 2, mxfp4.FP4_VALUES)


def test_dequantize_hf_nibble_order():
    # byte j: element 2j in the low nibble, 2j+1 in the high nibble (spec §3.2)
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x21  # element 0 = code 1 (0.5), element 1 = code 2 (1.0)
    blocks[0, 15] = 0xF9  # element 30 = code 9 (-0.5), element 31 = code 15 (-6)
    out = mxfp4.dequantize_hf(blocks, np.array([128], np.uint8))  # scale 2^1
    expected = np.zeros(32, np.float32)
    expected[[0, 1, 30, 31]] = [1.0, 2.0, -1.0, -12.0]
    np.testing.assert_array_equal(out, expected)


def test_dequantize_gguf_split_halves():
    # qs[j]: element j in the low nibble, element j+16 in the high nibble (spec §3.3)
    row = np.zeros(17, np.uint8)
    row[0] = 130  # 2^(130-128) = 4
    row[1] = 0x27  # element 0 = code 7 (kvalue 12), element 16 = code 2 (kvalue 2)
    out = mxfp4.dequantize_gguf(row)
    expected = np.zeros(32, np.float32)
    expected[0], expected[16] = 48.0, 8.0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("e", [0, 1, 2, 3, 100, 127, 200, 254])
def test_gguf_scale_is_ggml_e8m0_to_fp32_half(e):
    # GGML_E8M0_TO_FP32_HALF: bits (e-1)<<23 for e >= 2, denormal 0x00200000<<e below
    bits = (e - 1) << 23 if e >= 2 else 0x00200000 << e
    row = np.zeros(17, np.uint8)
    row[0], row[1] = e, 1  # element 0 = kvalue 1
    assert f32_bits(mxfp4.dequantize_gguf(row))[0] == bits


def _repack_scalar(blocks, scales):
    """Spec §3.3 written out byte by byte: e = scale; qs[j] = n(j) | n(j+16) << 4, n(k) the HF nibble of k."""
    out = bytearray()
    for b16, s in zip(blocks.reshape(-1, 16), scales.reshape(-1)):
        n = [(b16[k // 2] >> (4 * (k % 2))) & 0xF for k in range(32)]
        out.append(int(s))
        out += bytes(n[j] | (n[j + 16] << 4) for j in range(16))
    return np.frombuffer(bytes(out), np.uint8)


def test_repack_matches_spec_and_values():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    rows = mxfp4.hf_to_gguf(blocks, scales)
    assert rows.shape == (3, 5, 4 * 17)
    np.testing.assert_array_equal(rows.reshape(-1), _repack_scalar(blocks, scales))
    # Same values, bit for bit, denormal scales included. Only the sign of zero differs: ggml's int8 table has
    # no -0 (code 8 dequantizes to +0), which no computation can observe.
    a, b = mxfp4.dequantize_gguf(rows), mxfp4.dequantize_hf(blocks, scales)
    nz = b != 0
    np.testing.assert_array_equal(f32_bits(a[nz]), f32_bits(b[nz]))
    assert (a[~nz] == 0).all()


def _quantize_ref(x):
    """quantize_row_mxfp4_ref from ggml-quants.c, transcribed scalar by scalar in float32."""
    f = np.float32
    out = bytearray()
    for blk in np.asarray(x, np.float32).reshape(-1, 32):
        amax = f(0)
        for v in blk:
            if amax < abs(v):
                amax = abs(v)
        e = int(np.floor(np.log2(amax)) - 2 + 127) if amax > 0 else 0
        d = struct.unpack("<f", struct.pack("<I", (e - 1) << 23 if e >= 2 else 0x00200000 << e))[0]
        d = f(d)

        def best(v):
            bi, be = 0, abs(f(mxfp4.KVALUES[0]) * d - v)
            for i in range(1, 16):
                err = abs(f(mxfp4.KVALUES[i]) * d - v)
                if err < be:
                    bi, be = i, err
            return bi

        out.append(e)
        out += bytes(best(blk[j]) | (best(blk[j + 16]) << 4) for j in range(16))
    return np.frombuffer(bytes(out), np.uint8)


def test_quantizer_matches_llama_cpp_reference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 64)).astype(np.float32) * 0.02
    x[0, :32] = 0  # all-zero block -> e = 0
    x[1, :32] = np.arange(32) * 0.25  # exact table points and ties
    x[2, 32:] = -x[1, :32]
    x[3, :32] = 1e-3 * np.sign(rng.standard_normal(32))  # equal magnitudes
    x[4, 5] = 7.9  # saturation: amax/d in [8, 16) tops out at 12
    np.testing.assert_array_equal(mxfp4.quantize_gguf(x).reshape(-1), _quantize_ref(x))


def test_quantize_roundtrips_mxfp4_values():
    """Blocks that hold a code of magnitude 4 or 6 come back bit-exactly: the quantizer picks the same scale."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (64, 2, 16), dtype=np.uint8)
    lo, hi = blocks & 0xF, blocks >> 4
    lo[lo == 8], hi[hi == 8] = 0, 0  # -0 comes back as +0 (nearest entry, first index wins)
    blocks = lo | (hi << 4)
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | 7  # element 0 = +6
    scales = rng.integers(110, 140, (64, 2), dtype=np.uint8)
    values = mxfp4.dequantize_hf(blocks, scales)
    np.testing.assert_array_equal(mxfp4.quantize_gguf(values), mxfp4.hf_to_gguf(blocks, scales))


def test_quantize_error_bound():
    """Per block, with d = 2^(e-128): the table steps are at most 4d apart below 12d (error ≤ 2d), and values
    above 12d (amax < 16d) saturate (error < 4d)."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    rows = mxfp4.quantize_gguf(x)
    y = mxfp4.dequantize_gguf(rows)
    e = rows.reshape(256, 4, 17)[..., 0].astype(np.int32)
    d = np.ldexp(1.0, e - 128)[..., None]
    err = np.abs(y - x).reshape(256, 4, 32)
    assert (err <= 4 * d).all()
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
    assert 0.05 < rel < 0.2  # measured: ~0.10 relative RMS error on Gaussian weights


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        mxfp4.hf_to_gguf(np.zeros((2, 16), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError):
        mxfp4.dequantize_gguf(np.zeros(16, np.uint8))
    with pytest.raises(ValueError):
        mxfp4.quantize_gguf(np.zeros(31, np.float32))
