"""The portable row functions of `ossrt.engine.simd` (what CPUs other than x86 and AArch64 run) against plain NumPy
references: `format.mxfp4` for MXFP4, gguf's dequantizer for Q8_0, NumPy's float16 for f16. They are generic vector
code, so they run here on any CPU. The functions this CPU's kernels use (x86's pshufb, AArch64's tbl, or the portable
ones) are checked beside them on the same data."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from numba import njit

from ossrt.engine import simd
from ossrt.format import mxfp4

N_BLOCKS = [1, 2, 3, 7, 90]  # 90 blocks: a row of the 20b's 2880 inputs


@njit(fastmath=simd.FASTMATH)
def _dots(kind, w, x, selected=False):
    """Each row of w dotted with x by the portable function `kind` (0 MXFP4, 1 Q8_0, 2 F16), or by the one this
    CPU's kernels use (`selected`: x86's or AArch64's), as kernels call them."""
    out = np.empty(w.shape[0], dtype=np.float32)
    for r in range(w.shape[0]):
        if kind == 0:
            n_blocks = x.shape[0] // simd.MXFP4_BLOCK_SIZE
            out[r] = simd.row_dot_mxfp4(w[r], x, n_blocks) if selected else \
                simd.row_dot_mxfp4_portable(w[r], x, n_blocks)
        elif kind == 1:
            n_blocks = x.shape[0] // simd.Q8_0_BLOCK_SIZE
            out[r] = simd.row_dot_q8_0(w[r], x, n_blocks) if selected else simd.row_dot_q8_0_portable(w[r], x, n_blocks)
        else:
            out[r] = simd.row_dot_f16(w[r], x) if selected else simd.row_dot_f16_portable(w[r], x)
    return out


@njit
def _dequant_mxfp4(w, out, selected=False):
    """Rows of w decoded by the portable function, or by the one this CPU's kernels use."""
    for r in range(w.shape[0]):
        if selected:
            simd.dequant_row_mxfp4(w[r], out[r], out.shape[1] // simd.MXFP4_BLOCK_SIZE)
        else:
            simd.dequant_row_mxfp4_portable(w[r], out[r], out.shape[1] // simd.MXFP4_BLOCK_SIZE)


@njit
def _dequant_f16(bits, out):
    for r in range(bits.shape[0]):
        simd.dequant_row_f16_portable(bits[r], out[r])


def _random_mxfp4(rng, rows, n_blocks, exponents=(118, 136)):
    """Random block_mxfp4 rows: every nibble equally likely, scales 2^(e-128) for e in `exponents`."""
    w = rng.integers(0, 256, (rows, n_blocks, simd.MXFP4_BLOCK_BYTES), dtype=np.uint8)
    w[:, :, 0] = rng.integers(*exponents, (rows, n_blocks))
    return w.reshape(rows, -1)


def _close(got, expect, n):
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * np.sqrt(n) * np.abs(expect).max(initial=1.0))


def test_mxfp4_every_byte_and_every_scale_decodes_exactly():
    """All 256 code bytes (both nibbles of every pair) under all 256 scale bytes, denormal float scales included."""
    rows = np.empty((256, 16, simd.MXFP4_BLOCK_BYTES), dtype=np.uint8)
    rows[:, :, 0] = np.arange(256, dtype=np.uint8)[:, None]
    rows[:, :, 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rows = rows.reshape(256, -1)
    with np.errstate(over="ignore"):  # the largest scales times 12 are inf in float32, in both
        expect = mxfp4.dequantize_gguf(rows)
    for selected in (False, True):
        out = np.empty((256, 16 * simd.MXFP4_BLOCK_SIZE), dtype=np.float32)
        _dequant_mxfp4(rows, out, selected)
        np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
def test_mxfp4_rows(n_blocks):
    rng = np.random.default_rng(n_blocks)
    w = _random_mxfp4(rng, 13, n_blocks)
    n = n_blocks * simd.MXFP4_BLOCK_SIZE
    x = rng.standard_normal(n).astype(np.float32)
    dense = mxfp4.dequantize_gguf(w)
    out = np.empty((13, n), dtype=np.float32)
    _dequant_mxfp4(w, out)
    np.testing.assert_array_equal(out, dense)
    for selected in (False, True):
        _close(_dots(0, w, x, selected), dense.astype(np.float64) @ x, n)


def test_mxfp4_row_dot_with_quantized_weights_and_extreme_scales():
    """Weights from the quantizer (spec rounding) and blocks whose scales are float32 denormals or huge."""
    rng = np.random.default_rng(11)
    w = mxfp4.quantize_gguf(rng.standard_normal((5, 2880)).astype(np.float32))
    x = rng.standard_normal(2880).astype(np.float32)
    _close(_dots(0, w, x), mxfp4.dequantize_gguf(w).astype(np.float64) @ x, 2880)
    for exponents in ((0, 3), (240, 251)):  # e <= 250: 12·2^(e-128) stays finite in float32
        w = _random_mxfp4(rng, 4, 3, exponents)
        x = rng.standard_normal(96).astype(np.float32) * (2.0 ** -100 if exponents[0] else 1.0)
        _close(_dots(0, w, x), mxfp4.dequantize_gguf(w).astype(np.float64) @ x, 96)


def _q8_0_rows(rng, rows, n_blocks, scale_bits=None):
    w = quants.quantize(rng.standard_normal((rows, n_blocks * simd.Q8_0_BLOCK_SIZE)).astype(np.float32), T.Q8_0)
    if scale_bits is not None:  # chosen f16 scales: the first two bytes of each 34-byte block
        blocks = w.reshape(rows, n_blocks, simd.Q8_0_BLOCK_BYTES)
        blocks[:, :, :2] = np.resize(np.asarray(scale_bits, dtype=np.uint16), (rows, n_blocks)).view(np.uint8) \
            .reshape(rows, n_blocks, 2)
    return w


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
def test_q8_0_rows(n_blocks):
    rng = np.random.default_rng(100 + n_blocks)
    w = _q8_0_rows(rng, 11, n_blocks)
    n = n_blocks * simd.Q8_0_BLOCK_SIZE
    x = rng.standard_normal(n).astype(np.float32)
    for selected in (False, True):
        _close(_dots(1, w, x, selected), quants.dequantize(w, T.Q8_0).astype(np.float64) @ x, n)


def test_q8_0_denormal_zero_and_negative_scales():
    """f16 scales the portable widening must get right: denormals (smallest, largest), ±0, negative, the largest;
    each row has one of them in all its blocks, so each is checked at its own magnitude."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(4 * simd.Q8_0_BLOCK_SIZE).astype(np.float32)
    for bits in (0x0001, 0x03FF, 0x0000, 0x8000, 0x8001, 0xBC00, 0x7BFF, 0x3C00):
        w = _q8_0_rows(rng, 2, 4, [bits])
        expect = quants.dequantize(w, T.Q8_0).astype(np.float64) @ x
        got = _dots(1, w, x)
        assert np.all(np.abs(got - expect) <= 1e-5 * np.abs(expect)), hex(bits)


def test_f16_every_bit_pattern_widens_exactly():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(1024, 64)
    out = np.empty((1024, 64), dtype=np.float32)
    _dequant_f16(bits, out)
    with np.errstate(invalid="ignore"):  # AArch64 flags the signalling NaNs it quiets
        expect = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expect)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], expect.view(np.uint32)[~nan])  # signs of zeros too


@pytest.mark.parametrize("n", [8, 16, 40, 64, 2880, 2887])
def test_f16_rows(n):
    """Vectors of 16 and the plain-loop tail (8, 40, 2887), as dot products and as decoded rows."""
    rng = np.random.default_rng(n)
    w = rng.standard_normal((6, n)).astype(np.float16)
    x = rng.standard_normal(n).astype(np.float32)
    for selected in (False, True):
        _close(_dots(2, w.view(np.uint16), x, selected), w.astype(np.float64) @ x, n)
    out = np.empty((6, n), dtype=np.float32)
    _dequant_f16(w.view(np.uint16), out)
    np.testing.assert_array_equal(out, w.astype(np.float32))

