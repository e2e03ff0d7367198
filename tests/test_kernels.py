"""Numba kernels against plain NumPy: gguf's own dequantizer and the spec's formulas."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from ossrt.engine import kernels

from ossrt.format import mxfp4
from ossrt.format.modelfile import Tensor

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4]


def make_tensor(x: np.ndarray, qtype: T, name: str = "w") -> Tensor:
    """A Tensor as the model file would hold it: raw data in the file's layout."""
    x = np.asarray(x, dtype=np.float32)
    if qtype == T.F32:
        data = x
    elif qtype == T.F16:
        data = x.astype(np.float16)
    elif qtype == T.BF16:
        data = quants.quantize(x, T.BF16).view(np.uint16)
    elif qtype == T.MXFP4:
        data = mxfp4.quantize_gguf(x)
    else:
        data = quants.quantize(x, qtype)
    return Tensor(name, qtype, x.shape, data)


def reference(w: Tensor) -> np.ndarray:
    if w.type == T.BF16:
        return quants.dequantize(w.data.view(np.uint8), T.BF16).reshape(w.shape)
    if w.type == T.MXFP4:
        return mxfp4.dequantize_gguf(w.data)
    return quants.dequantize(w.data, w.type).reshape(w.shape).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (37, 160)])
def test_dequantize_equals_reference(qtype, shape):
    rng = np.random.default_rng(1)
    w = make_tensor(rng.standard_normal(shape) * 3, qtype)
    np.testing.assert_array_equal(kernels.dequantize(w), reference(w))
    rows = np.array([shape[0] - 1, 0, shape[0] - 1])
    np.testing.assert_array_equal(kernels.dequantize(w, rows=rows), reference(w)[rows])


def test_dequantize_mxfp4_extreme_scales_and_every_code():
    rows = np.zeros((4, 17), dtype=np.uint8)
    rows[:, 0] = [0, 1, 127, 250]  # denormal f32 scales, unit, huge
    rows[:, 1:] = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    w = Tensor("e", T.MXFP4, (4, 32), rows)
    np.testing.assert_array_equal(kernels.dequantize(w), mxfp4.dequantize_gguf(rows))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (5, 64), (37, 96), (300, 2880)])
def test_matvec_matches_dequantized_product(qtype, shape):
    rng = np.random.default_rng(2)
    w = make_tensor(rng.standard_normal(shape), qtype)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    expect = reference(w).astype(np.float64) @ x
    got = kernels.matvec(w, x)
    assert got.dtype == np.float32 and got.shape == (shape[0],)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * np.sqrt(shape[1]))


@pytest.mark.parametrize("qtype", TYPES)
def test_matmul_tiles_match_dequantized_product(qtype, monkeypatch):
    monkeypatch.setattr(kernels, "_TOKEN_TILE", 6)  # tiles of 6 tokens: a ragged last tile, and a tail of 4 + 1
    rng = np.random.default_rng(3)
    w = make_tensor(rng.standard_normal((23, 96)), qtype)
    X = rng.standard_normal((11, 96)).astype(np.float32)
    expect = X.astype(np.float64) @ reference(w).T.astype(np.float64)
    np.testing.assert_allclose(kernels.matmul(w, X), expect, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kernels.linear(w, X[:1]), expect[:1], rtol=1e-5, atol=1e-4)


def test_matvec_and_matmul_reject_wrong_sizes():
    w = make_tensor(np.ones((4, 64)), T.Q8_0)
    with pytest.raises(ValueError, match="input size 32"):
        kernels.matvec(w, np.ones(32, dtype=np.float32))
    with pytest.raises(ValueError, match="input size 65"):
        kernels.matmul(w, np.ones((2, 65), dtype=np.float32))
    with pytest.raises(ValueError, match="rows must be"):
        kernels.dequantize(w, rows=[4])


def moe_reference(gate, up, down, gb, ub, db, X, ids, weights, alpha=1.702, limit=7.0):
    """Spec §2.6 with the experts dequantized: clamped SwiGLU, +1 on the linear half, bias inside the sum."""
    G, U, D = (mxfp4.dequantize_gguf(t.data).astype(np.float64) for t in (gate, up, down))
    out = np.zeros(X.shape, dtype=np.float64)
    for t in range(X.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            g = np.minimum(G[e] @ X[t] + gb[e], limit)
            u = np.clip(U[e] @ X[t] + ub[e], -limit, limit)
            a = g / (1 + np.exp(-alpha * g)) * (u + 1)
            out[t] += w * (D[e] @ a + db[e])
    return out


def make_experts(rng, E, I, H):
    gate = make_tensor(rng.standard_normal((E, I, H)) / np.sqrt(H) * 2, T.MXFP4, "gate")
    up = make_tensor(rng.standard_normal((E, I, H)) / np.sqrt(H) * 2, T.MXFP4, "up")
    down = make_tensor(rng.standard_normal((E, H, I)) / np.sqrt(I), T.MXFP4, "down")
    biases = [rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((E, I), (E, I), (E, H))]
    return gate, up, down, *biases


@pytest.mark.parametrize("T_, dense_min_tokens", [(1, 2), (9, 2), (9, 1), (9, 10**9)])
def test_moe_matches_reference(T_, dense_min_tokens):
    rng = np.random.default_rng(4)
    E, I, H, k = 8, 64, 96, 4
    experts = make_experts(rng, E, I, H)
    X = (rng.standard_normal((T_, H)) * 2).astype(np.float32)  # large enough that the clamps bite
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T_)])
    w = rng.dirichlet(np.ones(k), T_).astype(np.float32)
    got = kernels.moe(*experts, X, ids, w, dense_min_tokens=dense_min_tokens)
    expect = moe_reference(*experts, X, ids, w)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_moe_rejects_bad_expert_ids_and_shapes():
    rng = np.random.default_rng(5)
    experts = make_experts(rng, 4, 32, 32)
    X = np.ones((1, 32), dtype=np.float32)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        kernels.moe(*experts, X, np.array([[0, 4]]), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        kernels.moe(*experts, X, np.array([[0, 1]]), np.ones((1, 3), np.float32))
    gate, up, down, gb, ub, db = experts
    with pytest.raises(ValueError, match="down bias"):
        kernels.moe(gate, up, down, gb, ub, db[:, :5], X, np.array([[0, 1]]), np.ones((1, 2), np.float32))


def test_set_num_threads():
    import numba

    assert kernels.set_num_threads(1) == 1 and numba.get_num_threads() == 1
    assert kernels.set_num_threads(None) == numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError, match="threads"):
        kernels.set_num_threads(0)


def test_scalar_fallbacks_match_the_reference():
    """The plain loops used where the SIMD code cannot run (non-x86 CPUs) give the same values."""
    from numba import njit

    from ossrt.engine import simd

    @njit
    def dots(w, x, kind):
        out = np.empty(w.shape[0], dtype=np.float32)
        for r in range(w.shape[0]):
            if kind == 0:
                out[r] = simd.row_dot_mxfp4_scalar(w[r], x, x.shape[0] // 32)
            else:
                out[r] = simd.row_dot_q8_0_scalar(w[r], x, x.shape[0] // 32)
        return out

    @njit
    def dequant(w, n):
        out = np.empty((w.shape[0], n), dtype=np.float32)
        for r in range(w.shape[0]):
            simd.dequant_row_mxfp4_scalar(w[r], out[r], n // 32)
        return out

    rng = np.random.default_rng(6)
    x = rng.standard_normal(96).astype(np.float32)
    for kind, qtype in enumerate((T.MXFP4, T.Q8_0)):
        w = make_tensor(rng.standard_normal((9, 96)), qtype)
        np.testing.assert_allclose(dots(w.data, x, kind), reference(w).astype(np.float64) @ x, rtol=1e-5, atol=1e-4)
    w = make_tensor(rng.standard_normal((9, 96)), T.MXFP4)
    np.testing.assert_array_equal(dequant(w.data, 96), reference(w))


def attend_reference(q, keys, values, first, last, sinks, scale):
    out = np.zeros(q.shape)
    per_kv = q.shape[1] // keys.shape[0]
    for t in range(q.shape[0]):
        for h in range(q.shape[1]):
            k = keys[h // per_kv, first[t]:last[t]].astype(np.float64)
            a = k @ q[t, h] * scale
            z = np.concatenate([a, [sinks[h]]])
            p = np.exp(z - z.max())
            p /= p.sum()
            out[t, h] = p[:-1] @ values[h // per_kv, first[t]:last[t]]
    return out


def test_attention_kernels_match_the_reference():
    rng = np.random.default_rng(7)
    n_head, n_kv, d, N = 6, 2, 16, 20
    keys = rng.standard_normal((n_kv, N, d)).astype(np.float32)
    values = rng.standard_normal((n_kv, N, d)).astype(np.float32)
    sinks = rng.standard_normal(n_head).astype(np.float32)
    q = rng.standard_normal((5, n_head, d)).astype(np.float32)
    first, last = np.array([0, 3, 3, 10, 19]), np.array([1, 8, 20, 15, 20])
    np.testing.assert_allclose(kernels.attend_block(q, keys, values, first, last, sinks, 0.25),
                               attend_reference(q, keys, values, first, last, sinks, 0.25), rtol=1e-5, atol=1e-5)
    # Decode: 7 keys from ring slot 16, wrapping past the end of the 20 slots.
    slots = np.arange(16, 23) % N
    got = kernels.attend(q[0], keys, values, 16, 7, sinks, 0.25)
    expect = attend_reference(q[:1], keys[:, slots], values[:, slots], [0], [7], sinks, 0.25)[0]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key ranges"):
        kernels.attend_block(q, keys, values, first, last + 1, sinks, 0.25)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.attend(q[0], keys, values, 16, 21, sinks, 0.25)


def test_ring_attention_over_an_f16_cache():
    rng = np.random.default_rng(8)
    keys = rng.standard_normal((2, 12, 16)).astype(np.float16)
    values = rng.standard_normal((2, 12, 16)).astype(np.float16)
    sinks = rng.standard_normal(4).astype(np.float32)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    got = kernels.attend(q, keys.view(np.uint16), values.view(np.uint16), 9, 5, sinks, 0.25)
    slots = np.arange(9, 14) % 12
    expect = attend_reference(q[None], keys[:, slots].astype(np.float32), values[:, slots].astype(np.float32),
                              [0], [5], sinks, 0.25)[0]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_ring_attention_over_a_q8_0_cache():
    from ossrt.engine.kv_cache import _dequantize_q8, _quantize_q8

    rng = np.random.default_rng(9)
    keys, key_scales = _quantize_q8(rng.standard_normal((2, 12, 64)).astype(np.float32))
    values, value_scales = _quantize_q8(rng.standard_normal((2, 12, 64)).astype(np.float32))
    sinks = rng.standard_normal(4).astype(np.float32)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    got = kernels.attend_q8(q, keys, key_scales, values, value_scales, 10, 6, sinks, 0.125)
    slots = np.arange(10, 16) % 12
    expect = attend_reference(q[None], _dequantize_q8(keys, key_scales)[:, slots],
                              _dequantize_q8(values, value_scales)[:, slots], [0], [6], sinks, 0.125)[0]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q8_0 attention shapes"):
        kernels.attend_q8(q, keys, key_scales[..., :1], values, value_scales, 10, 6, sinks, 0.125)
