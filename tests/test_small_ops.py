"""The CPU's small operations (`engine.small_ops`: RMSNorm, RoPE, the router's top-k) against NumPy written from
the spec, in float64."""

import numpy as np
import pytest

from ossrt.engine import small_ops


@pytest.mark.parametrize("T", [1, 5])
def test_rms_norm(T):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((T, 2880)) * 3).astype(np.float32)
    x[0, :7] = 1e4  # a few large values: the mean of squares is still exact
    gain = rng.standard_normal(2880).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5) * gain
    got = small_ops.rms_norm(x, gain, 1e-5)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


def test_rms_norm_rejects_a_gain_of_another_size():
    with pytest.raises(ValueError, match="do not fit"):
        small_ops.rms_norm(np.ones((2, 64), np.float32), np.ones(32, np.float32), 1e-5)


@pytest.mark.parametrize("T, heads", [(1, 64), (3, 8)])
def test_rope_rotates_half_split_pairs_in_place(T, heads):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((T, heads, 64)).astype(np.float32)
    angles = rng.uniform(-100, 100, (T, 32))
    cos, sin = (f(angles) * 1.3 for f in (np.cos, np.sin))
    a, b = v[..., :32].astype(np.float64), v[..., 32:].astype(np.float64)
    c, s = cos[:, None], sin[:, None]
    want = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    got = small_ops.rope(v, cos.astype(np.float32), sin.astype(np.float32))
    assert got is v  # a contiguous float32 array is rotated where it lies
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_of_a_view_rotates_a_copy():
    v = np.ones((2, 3, 8), np.float32)
    cos, sin = np.zeros((2, 4), np.float32), np.ones((2, 4), np.float32)
    got = small_ops.rope(v[:, ::2], cos, sin)
    np.testing.assert_array_equal(got, np.concatenate([-np.ones((2, 2, 4)), np.ones((2, 2, 4))], axis=-1))
    np.testing.assert_array_equal(v, 1)
    with pytest.raises(ValueError, match="do not fit"):
        small_ops.rope(v, cos[:1], sin[:1])


def test_router_top_k_and_softmax_over_them():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 32)).astype(np.float32) * 3
    logits[5, [3, 9, 20]] = 7.0  # a tie: the lowest index first
    ids, weights = small_ops.router(logits, 4)
    assert ids.dtype == np.int64 and weights.dtype == np.float32 and ids.shape == weights.shape == (6, 4)
    for t in range(6):
        top = np.argsort(-logits[t].astype(np.float64), kind="stable")[:4]
        np.testing.assert_array_equal(ids[t], top)
        p = np.exp(logits[t, top].astype(np.float64) - logits[t, top].max())
        np.testing.assert_allclose(weights[t], p / p.sum(), rtol=1e-6)
    assert ids[5, :3].tolist() == [3, 9, 20]


def test_router_of_non_finite_logits_gives_valid_ids():
    """NaN logits (corrupt weights; caught after the forward pass) still give k distinct ids in range, so the MoE
    kernels never index outside the experts."""
    logits = np.full((2, 8), np.nan, np.float32)
    logits[1, 2] = 1.0
    ids, _ = small_ops.router(logits, 3)
    assert all(len(set(row)) == 3 and all(0 <= e < 8 for e in row) for row in ids.tolist())
    with pytest.raises(ValueError, match="top 9"):
        small_ops.router(logits, 9)
