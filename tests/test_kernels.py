"""Numba weight kernels against plain NumPy: gguf's own dequantizer and the spec's formulas (attention: see
test_attention.py)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from ossrt.engine import kernels
from ossrt.engine.reference import weight as reference  # gguf's dequantizer, float64
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
    expect = reference(w) @ x
    got = kernels.matvec(w, x)
    assert got.dtype == np.float32 and got.shape == (shape[0],)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * np.sqrt(shape[1]))


@pytest.mark.parametrize("qtype", TYPES)
def test_matmul_tiles_match_dequantized_product(qtype, monkeypatch):
    monkeypatch.setattr(kernels, "_TOKEN_TILE", 6)  # tiles of 6 tokens: a ragged last tile, and a tail of 4 + 1
    rng = np.random.default_rng(3)
    w = make_tensor(rng.standard_normal((23, 96)), qtype)
    X = rng.standard_normal((11, 96)).astype(np.float32)
    expect = X.astype(np.float64) @ reference(w).T
    np.testing.assert_allclose(kernels.matmul(w, X), expect, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kernels.linear(w, X[:1]), expect[:1], rtol=1e-5, atol=1e-4)



@pytest.mark.parametrize("qtype", [T.F16, T.BF16])
def test_matmul_of_16bit_rows_past_whole_vectors(qtype):
    """Rows of 40 values: two vectors of 16 decoded at once, then 8 one at a time."""
    rng = np.random.default_rng(4)
    w = make_tensor(rng.standard_normal((9, 40)), qtype)
    X = rng.standard_normal((5, 40)).astype(np.float32)
    np.testing.assert_allclose(kernels.matmul(w, X), X.astype(np.float64) @ reference(w).T, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("qtype", TYPES)
def test_linear_many_is_linear_on_each(qtype):
    """One token through several matrices in one pass (Q8_0, BF16) gives each `linear`'s numbers, bit for bit;
    other types and more tokens take `linear` on each."""
    rng = np.random.default_rng(12)
    ws = [make_tensor(rng.standard_normal((n, 96)), qtype, f"w{i}") for i, n in enumerate((64, 32, 7))]
    for X in (rng.standard_normal((1, 96)).astype(np.float32), rng.standard_normal((5, 96)).astype(np.float32)):
        got = kernels.linear_many(ws, X)
        assert [g.tobytes() for g in got] == [kernels.linear(w, X).tobytes() for w in ws]
        assert [g.shape for g in got] == [(len(X), 64), (len(X), 32), (len(X), 7)]
    with pytest.raises(ValueError, match="input size 64"):
        kernels.linear_many(ws, np.ones((1, 64), dtype=np.float32))


def test_matvec_and_matmul_reject_wrong_sizes():
    w = make_tensor(np.ones((4, 64)), T.Q8_0)
    with pytest.raises(ValueError, match="input size 32"):
        kernels.matvec(w, np.ones(32, dtype=np.float32))
    with pytest.raises(ValueError, match="input size 65"):
        kernels.matmul(w, np.ones((2, 65), dtype=np.float32))
    with pytest.raises(ValueError, match="rows must be"):
        kernels.dequantize(w, rows=[4])


ALPHA, LIMIT = 1.702, 7.0  # gpt-oss's swiglu_alpha and swiglu_limit


def moe_reference(gate, up, down, gb, ub, db, X, ids, weights, alpha, limit):
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
    got = kernels.moe(*experts, X, ids, w, alpha=ALPHA, limit=LIMIT, dense_min_tokens=dense_min_tokens)
    expect = moe_reference(*experts, X, ids, w, ALPHA, LIMIT)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_moe_rejects_bad_expert_ids_and_shapes():
    rng = np.random.default_rng(5)
    experts = make_experts(rng, 4, 32, 32)
    X = np.ones((1, 32), dtype=np.float32)
    # One token (decode: the kernel checks before it reads a weight) and several, each kernel.
    for bad, n in (([0, 4], 1), ([-1, 2], 1), ([0, 4], 3)):
        for int8_activations in (False, True):
            with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
                kernels.moe(*experts, np.ones((n, 32), np.float32), np.array([bad] * n),
                            np.ones((n, 2), np.float32), alpha=ALPHA, limit=LIMIT, int8_activations=int8_activations)
    with pytest.raises(ValueError, match="do not match"):
        kernels.moe(*experts, X, np.array([[0, 1]]), np.ones((1, 3), np.float32), alpha=ALPHA, limit=LIMIT)
    gate, up, down, gb, ub, db = experts
    with pytest.raises(ValueError, match="down bias"):
        kernels.moe(gate, up, down, gb, ub, db[:, :5], X, np.array([[0, 1]]), np.ones((1, 2), np.float32),
                    alpha=ALPHA, limit=LIMIT)


def test_set_num_threads():
    import numba

    assert kernels.set_num_threads(1) == 1 and numba.get_num_threads() == 1
    assert kernels.set_num_threads(None) == numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError, match="threads"):
        kernels.set_num_threads(0)


def test_portable_row_functions_match_the_reference():
    """The vector code used off x86 and AArch64 (tests/test_simd_portable.py checks it in depth) gives the same
    values inside a kernel."""
    from numba import njit

    from ossrt.engine import simd

    @njit
    def dots(w, x, kind):
        out = np.empty(w.shape[0], dtype=np.float32)
        for r in range(w.shape[0]):
            if kind == 0:
                out[r] = simd.row_dot_mxfp4_portable(w[r], x, x.shape[0] // 32)
            else:
                out[r] = simd.row_dot_q8_0_portable(w[r], x, x.shape[0] // 32)
        return out

    @njit
    def dequant(w, n):
        out = np.empty((w.shape[0], n), dtype=np.float32)
        for r in range(w.shape[0]):
            simd.dequant_row_mxfp4_portable(w[r], out[r], n // 32)
        return out

    rng = np.random.default_rng(6)
    x = rng.standard_normal(96).astype(np.float32)
    for kind, qtype in enumerate((T.MXFP4, T.Q8_0)):
        w = make_tensor(rng.standard_normal((9, 96)), qtype)
        np.testing.assert_allclose(dots(w.data, x, kind), reference(w) @ x, rtol=1e-5, atol=1e-4)
    w = make_tensor(rng.standard_normal((9, 96)), T.MXFP4)
    np.testing.assert_array_equal(dequant(w.data, 96), reference(w))


@pytest.mark.parametrize("portable", [False, True], ids=["this-cpu", "portable"])
def test_kv_cache_row_decoders(portable):
    """The row decoders attention uses on f16 and q8_0 caches (vector code with a scalar tail; the f16 one widened
    by integer arithmetic off x86 and AArch64) give the exact float32 values."""
    from ossrt.engine import simd
    from test_attention import quantize_q8_0

    f16 = simd.dequant_row_f16_portable if portable else simd.dequant_row_f16
    q8 = simd.dequant_row_q8_split
    rng = np.random.default_rng(7)
    for n in (8, 16, 40, 64):  # 40: two chunks of 16 and a tail of 8
        x = rng.standard_normal(n).astype(np.float16)
        out = np.empty(n, dtype=np.float32)
        f16(x.view(np.uint16), out)
        np.testing.assert_array_equal(out, x.astype(np.float32))
    values, scales = quantize_q8_0(rng.standard_normal(96).astype(np.float32))
    out = np.empty(96, dtype=np.float32)
    q8(values, scales, out)
    np.testing.assert_array_equal(out, (values.reshape(3, 32) * scales[:, None]).reshape(-1))
