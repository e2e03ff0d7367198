"""MXFP4 in plain NumPy: the reference every fast kernel and the converter are checked against (spec §3).

Two byte layouts hold the same values:
- HF / OpenAI checkpoints (spec §3.2): `blocks[..., G, 16]` + `scales[..., G]`; byte j holds element 2j in its
  low nibble and element 2j+1 in its high nibble; value = FP4[nibble] * 2^(scale - 127).
- GGUF `block_mxfp4` (spec §3.3): 17 bytes per block, `e` then `qs[16]`; qs[j] holds element j (low nibble) and
  element j+16 (high nibble); value = kvalues[nibble] * 2^(e - 128), kvalues being the doubled E2M1 table.
The scale byte is the same in both, so HF -> GGUF is a pure nibble shuffle: bit-exact, never requantized.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Values per block (in both layouts) and bytes per GGUF block_mxfp4 (the scale byte e, then qs), as ggml defines them.
BLOCK_VALUES, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4]
CODE_BYTES = BLOCK_VALUES // 2  # a block's 4-bit codes, two a byte: HF's blocks[..., 16], GGUF's qs[16]

# E2M1 code -> value; bit 3 is the sign (OCP MX spec).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
# ggml's kvalues_mxfp4: the same table doubled, as int8, paired with a halved scale.
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def _pow2(exponent: np.ndarray) -> np.ndarray:
    """2**exponent as float32; ldexp is exact, including float32 denormals for tiny scales."""
    return np.ldexp(np.float32(1.0), exponent.astype(np.int32)).astype(np.float32)


def _hf_codes(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The E2M1 codes of HF `blocks[..., G, 16]` in element order, `[..., G, 32]`, after checking `scales[..., G]`
    matches."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1] != CODE_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    codes = np.empty(blocks.shape[:-1] + (BLOCK_VALUES,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F  # element 2j
    codes[..., 1::2] = blocks >> 4  # element 2j+1
    return codes


def dequantize_hf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF layout `blocks[..., G, 16]`, `scales[..., G]` -> float32 `[..., G*32]`."""
    values = FP4_VALUES[_hf_codes(blocks, scales)] * _pow2(scales.astype(np.int32) - 127)[..., None]
    return values.reshape(blocks.shape[:-2] + (-1,))


def dequantize_gguf(rows: np.ndarray, n: int | None = None) -> np.ndarray:
    """GGUF `block_mxfp4` rows, uint8 `[..., G*17]` -> float32 `[..., G*32]` (`n`, if given, checks G*32)."""
    if rows.dtype != np.uint8 or rows.shape[-1] % BLOCK_BYTES:
        raise ValueError(f"MXFP4 rows must be uint8 with a multiple of {BLOCK_BYTES} bytes, got {rows.shape}")
    g = rows.shape[-1] // BLOCK_BYTES
    if n is not None and n != g * BLOCK_VALUES:
        raise ValueError(f"MXFP4 rows hold {g * BLOCK_VALUES} values, expected {n}")
    b = rows.reshape(rows.shape[:-1] + (g, BLOCK_BYTES))
    e, qs = b[..., 0], b[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # elements 0..15, then 16..31
    values = KVALUES[codes].astype(np.float32) * _pow2(e.astype(np.int32) - 128)[..., None]
    return values.reshape(rows.shape[:-1] + (g * BLOCK_VALUES,))


def hf_to_gguf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Repack HF `blocks[..., G, 16]` + `scales[..., G]` into GGUF rows uint8 `[..., G*17]`, bit-exactly
    (llama.cpp `transform_nibble_layout` + `repack_mxfp4`): the scale byte is copied, nibbles reordered."""
    codes = _hf_codes(blocks, scales)
    out = np.empty(blocks.shape[:-1] + (BLOCK_BYTES,), dtype=np.uint8)
    out[..., 0] = scales
    out[..., 1:] = codes[..., :CODE_BYTES] | (codes[..., CODE_BYTES:] << 4)
    return out.reshape(blocks.shape[:-2] + (-1,))


def quantize_gguf(x: np.ndarray) -> np.ndarray:
    """float `[..., N]` (N a multiple of 32) -> GGUF rows uint8 `[..., N/32*17]`.

    Rounding rule: llama.cpp's `quantize_row_mxfp4_ref`, so our files match theirs byte for byte. Per block,
    e = floor(log2(amax)) - 2 + 127 (0 for an all-zero block; clipped to 0..254 where C's cast would be
    undefined), d = 2^(e-128), and each value takes the kvalues entry nearest to it at scale d, computed in
    float32; ties go to the lower table index. amax / d lies in [8, 16), so values above 12·d saturate to ±12·d.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK_VALUES:
        raise ValueError(f"MXFP4 quantization needs a multiple of {BLOCK_VALUES} values per row, got {x.shape[-1]}")
    g = x.shape[-1] // BLOCK_VALUES
    xb = x.reshape(x.shape[:-1] + (g, BLOCK_VALUES))
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore"):
        e_f = np.floor(np.log2(amax)) - 2 + 127
    e = np.where(amax > 0, np.clip(e_f, 0, 254), 0).astype(np.uint8)
    d = _pow2(e.astype(np.int32) - 128)[..., None]
    best = np.zeros(xb.shape, dtype=np.uint8)
    best_err = np.abs(np.float32(0) * d - xb)
    for i in range(1, 16):  # the C loop: strict < keeps the first index on ties
        err = np.abs(np.float32(KVALUES[i]) * d - xb)
        better = err < best_err
        best[better] = i
        best_err = np.where(better, err, best_err)
    out = np.empty(x.shape[:-1] + (g, BLOCK_BYTES), dtype=np.uint8)
    out[..., 0] = e
    out[..., 1:] = best[..., :CODE_BYTES] | (best[..., CODE_BYTES:] << 4)
    return out.reshape(x.shape[:-1] + (g * BLOCK_BYTES,))
