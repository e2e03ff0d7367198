"""The attention core against a float64 reference of spec §2.4, for every KV storage type, one query and a block,
in full layers and in rings that wrap around; and what `LayerKV.store` keeps."""

import numpy as np
import pytest
from numba import njit

from ossrt.defaults import KV_TYPES
from ossrt.engine.attention import attend
from ossrt.engine.kv_cache import LayerKV, f16_bits

N_HEAD, N_KV, D = 6, 2, 64  # three query heads per KV head; q8_0 needs whole blocks of 32


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's Q8_0 rule in NumPy, float32: [..., d] → int8 [..., d] and scales [..., d/32] (amax/127, round
    half away from zero)."""
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // 32, 32))
    scale = np.abs(blocks).max(axis=-1) / 127
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.trunc(blocks * inv[..., None] + np.copysign(0.5, blocks)).astype(np.int8)
    return q.reshape(x.shape), scale.astype(np.float32)


def as_stored(x: np.ndarray, kv_type: str) -> np.ndarray:
    """float64 of what a cache of `kv_type` keeps of x [..., D]: f16 rounding, or q8_0 values times their scale."""
    if kv_type == "f16":
        return x.astype(np.float16).astype(np.float64)
    if kv_type == "q8_0":
        q, scale = quantize_q8_0(x)
        return (q.reshape(q.shape[:-1] + (-1, 32)) * scale[..., None].astype(np.float64)).reshape(x.shape)
    return x.astype(np.float64)


def attention_reference(q, keys, values, start, window, sinks, scale):
    """Spec §2.4 in float64: queries q [T, n_head, d] at positions start.., keys/values [positions, n_kv, d] by
    absolute position; the sink an extra logit whose probability is dropped."""
    T, n_head = q.shape[:2]
    per_kv = n_head // keys.shape[1]
    out = np.zeros(q.shape)
    for t in range(T):
        pos = start + t
        first = max(0, pos - window + 1)
        for h in range(n_head):
            k = keys[first:pos + 1, h // per_kv]
            a = np.concatenate([k @ q[t, h].astype(np.float64) * scale, [sinks[h]]])
            p = np.exp(a - a.max())
            p /= p.sum()
            out[t, h] = p[:-1] @ values[first:pos + 1, h // per_kv]
    return out


# (window, chunk, steps): a ring of window + chunk - 1 slots wrapping several times; a full layer (the window is
# the context); and sizes past the kernel's tiles (16 queries, 64 keys), so blocks span query tiles, windows span
# key tiles, and key tiles are cut at the ring's end.
CASES = {
    "ring": (7, 5, [5, 1, 1, 5, 3, 1, 5, 5, 1, 4, 5, 4]),
    "full": (40, 5, [5, 1, 1, 5, 3, 1, 5, 5, 1, 4, 5, 4]),
    "tiles": (70, 40, [40, 1, 33, 40, 7, 1, 40, 38, 40, 20, 40]),
    "full-tiles": (300, 40, [40, 1, 33, 40, 7, 1, 40, 38, 40, 20, 40]),
}


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("case", CASES)
def test_attention_over_the_cache_matches_the_reference(kv_type, case):
    """Blocks of queries (prefill) and single queries (decode) stored, then attended over, as the model does."""
    window, chunk, steps = CASES[case]
    context = sum(steps)
    rng = np.random.default_rng(1)
    capacity = min(window + chunk - 1, context)
    kv = LayerKV(N_KV, capacity, D, kv_type, window)
    keys = rng.standard_normal((context, N_KV, D)).astype(np.float32)
    values = rng.standard_normal((context, N_KV, D)).astype(np.float32)
    q = rng.standard_normal((context, N_HEAD, D)).astype(np.float32) * 0.5
    sinks = rng.standard_normal(N_HEAD).astype(np.float32)
    stored_keys, stored_values = as_stored(keys, kv_type), as_stored(values, kv_type)
    start = 0
    for T in steps:
        kv.store(start, keys[start:start + T], values[start:start + T])
        got = attend(q[start:start + T], kv, start, sinks, 0.125)
        expect = attention_reference(q[start:start + T], stored_keys, stored_values, start, window, sinks, 0.125)
        assert got.dtype == np.float32 and got.shape == (T, N_HEAD, D)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
        start += T


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("n_head, n_kv, d", [(4, 4, 24), (8, 2, 40), (2, 1, 16), (10, 2, 66)])
def test_attention_of_other_head_shapes_matches_the_reference(kv_type, n_head, n_kv, d):
    """Head sizes that are not whole vectors of 16 (the lanes past them take a loop of their own), one to five
    query heads per KV head (pairs and a lone one), a scale that is not a power of two; prefill past a key tile,
    then decode."""
    window, steps = 100, [70, 1, 1, 30, 1]
    context = sum(steps)
    rng = np.random.default_rng(4)
    kv = LayerKV(n_kv, context, d, kv_type, window)
    keys = rng.standard_normal((context, n_kv, d)).astype(np.float32)
    values = rng.standard_normal((context, n_kv, d)).astype(np.float32)
    q = rng.standard_normal((context, n_head, d)).astype(np.float32) * 0.5
    sinks = rng.standard_normal(n_head).astype(np.float32)
    scale = 1 / np.sqrt(d)
    start = 0
    for T in steps:
        kv.store(start, keys[start:start + T], values[start:start + T])
        got = attend(q[start:start + T], kv, start, sinks, scale)
        expect = attention_reference(q[start:start + T], as_stored(keys, kv_type), as_stored(values, kv_type), start,
                                     window, sinks, scale)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
        start += T


def test_store_rounds_as_each_type_says():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, N_KV, D)).astype(np.float32) * 10
    x[0, 0, :32] = 0  # a zero block
    x[1, 0, :4] = [127.0, 0.5, -0.5, -0.0]  # scale 1: halves away from zero
    for kv_type in KV_TYPES:
        kv = LayerKV(N_KV, 4, D, kv_type, 4)
        kv.store(2, x, x)  # positions 2, 3, 4: slots 2, 3, 0
        slots = [2, 3, 0]
        if kv_type == "f32":
            np.testing.assert_array_equal(kv.keys[:, slots], x.transpose(1, 0, 2))
        elif kv_type == "f16":
            np.testing.assert_array_equal(kv.values[:, slots].view(np.float16), x.transpose(1, 0, 2).astype(np.float16))
        else:
            q, scale = kv.keys[:, slots], kv.key_scales[:, slots]
            blocks = x.transpose(1, 0, 2).reshape(N_KV, 3, D // 32, 32)
            np.testing.assert_allclose(scale, np.abs(blocks).max(axis=-1) / 127, rtol=1e-7)
            error = blocks - q.reshape(blocks.shape) * scale[..., None]
            assert (np.abs(error) <= scale[..., None] / 2 * (1 + 1e-6)).all()  # rounded to the nearest step
            want_q, want_scale = quantize_q8_0(x.transpose(1, 0, 2))  # the rule in NumPy, bit for bit
            np.testing.assert_array_equal(q, want_q)
            np.testing.assert_array_equal(scale, want_scale)



@njit
def f16_bits_of(bits, out):
    for i in range(bits.shape[0]):
        out[i] = f16_bits(bits[i])


def test_f16_rounding_is_numpys():
    """The store's float32 → f16 against NumPy's astype, bit for bit: random bit patterns over every exponent, and
    the edges (the largest half and the tie above it, the smallest normal and subnormal, ties to even there, zeros,
    infinities); NaN stays NaN."""
    rng = np.random.default_rng(3)
    edges = np.array([65504, 65519.996, 65520, 65536, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -12), 2.0 ** -24,
                      2.0 ** -25, 2.0 ** -25 * (1 + 2.0 ** -23), 3 * 2.0 ** -25, 5 * 2.0 ** -25, 2.0 ** -26, 0.0,
                      1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf], dtype=np.float32)
    x = np.concatenate([rng.integers(0, 2 ** 32, 2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        edges, -edges, np.array([np.nan], np.float32)])
    got = np.empty(x.size, dtype=np.uint16)
    f16_bits_of(x.view(np.uint32), got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got[~nan], want[~nan].view(np.uint16))
    assert np.isnan(got[nan].view(np.float16)).all()

def test_q8_0_rounds_halves_away_from_zero_and_keeps_zero_blocks():
    x = np.zeros((2, 32), dtype=np.float32)
    x[0, :3] = [127.0, 0.5, -0.5]  # scale 1: the halves go to 1 and -1
    q, scale = quantize_q8_0(x)
    assert scale.tolist() == [[1.0], [0.0]]
    assert q[0, :3].tolist() == [127, 1, -1] and not q[1].any()


def test_attend_rejects_what_does_not_fit():
    kv = LayerKV(N_KV, 11, D, "f32", 7)
    q = np.zeros((6, N_HEAD, D), dtype=np.float32)
    sinks = np.zeros(N_HEAD, dtype=np.float32)
    attend(q[:5], kv, 20, sinks, 0.125)  # positions 14..24 fill the 11 slots
    with pytest.raises(ValueError, match="do not fit 11 slots"):
        attend(q, kv, 20, sinks, 0.125)
    with pytest.raises(ValueError, match="attention shapes"):
        attend(q[:, :5], kv, 20, sinks[:5], 0.125)
    with pytest.raises(ValueError, match="do not fit 11 slots"):
        kv.store(0, np.zeros((12, N_KV, D)), np.zeros((12, N_KV, D)))
