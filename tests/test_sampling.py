"""Sampling: the distributions after temperature / top-k / top-p / min-p against a brute-force reference written
from the definitions, seeded draws, greedy, and the parameter errors."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ossrt.errors import ParameterError
from ossrt.engine.sampling import Sampler, _draw, check_params, probabilities

# Chi-square critical values at p = 0.001 for 1..5 degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def reference(logits, temperature, top_p, top_k, min_p):
    """Float64, the whole vocabulary sorted by falling logit, ties lowest id first (by logit, not probability:
    logits 0 and 2e-37 differ but give equal probabilities), HF order: temperature, top-k, top-p on the
    renormalised survivors, min-p against the largest probability, renormalise.
    Returns (probabilities, kept mask, unsure mask: tokens whose top-p / min-p decision lies within 1e-6 of its
    boundary, which float32 exp may decide either way)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.lexsort((np.arange(p.size), -np.asarray(logits, dtype=np.float64)))
    keep = order[:top_k] if top_k else order
    unsure = np.zeros(p.size, bool)
    if top_p < 1:
        q = p[keep] / p[keep].sum()
        cum = np.cumsum(q)
        unsure[keep[1:][np.abs(cum[:-1] - top_p) < 1e-6]] = True  # the token after a prefix that nearly reaches
        keep = keep[: np.flatnonzero(cum >= top_p)[0] + 1] if cum[-1] >= top_p else keep
    if min_p > 0:
        ratio = p[keep] / p[keep].max()
        unsure[keep[(np.abs(ratio - min_p) < 1e-6) & (z[keep] != z.max())]] = True  # exact maxima are exact
        keep = keep[ratio >= min_p]
    mask = np.zeros(p.size, bool)
    mask[keep] = True
    out = np.where(mask, p, 0.0)
    return out / out.sum(), mask, unsure


def check_against_reference(logits, **params):
    got = probabilities(logits, **params)
    ref, mask, unsure = reference(logits, **params)
    assume(not unsure.any())
    assert got.dtype == np.float64 and abs(got.sum() - 1) < 1e-9
    np.testing.assert_array_equal(got > 0, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12)


# Logits span at most 40 and temperature >= 0.5, so no kept token's float32 weight underflows to 0.
@settings(max_examples=400, deadline=None)
@given(logits=st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=40),
       temperature=st.floats(0.5, 3), top_p=st.one_of(st.just(1.0), st.floats(0.01, 0.999)),
       top_k=st.integers(0, 12), min_p=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.01, 1.0)),
       ties=st.booleans())
def test_probabilities_equal_reference(logits, temperature, top_p, top_k, min_p, ties):
    logits = np.array(logits, dtype=np.float32)
    if ties:  # few distinct values, so ties fall on the top-k boundary
        logits = np.round(logits / 8).astype(np.float32)
    check_against_reference(logits, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)


@pytest.mark.parametrize("params", [dict(top_k=50), dict(top_p=0.9), dict(top_p=0.5, top_k=1000),
                                    dict(min_p=0.05), dict(top_k=40, top_p=0.95, min_p=0.1, temperature=0.7),
                                    dict(top_p=0.999, temperature=2.0)])
@pytest.mark.parametrize("spread", [1.0, 6.0])
def test_full_vocabulary_equals_reference(params, spread):
    """201,088 logits: flat (spread 1: the nucleus needs most of the vocabulary) and peaked (spread 6)."""
    logits = (np.random.default_rng(5).standard_normal(201088) * spread).astype(np.float32)
    logits[::7] = -np.inf
    got = probabilities(logits, **params)
    ref, mask, unsure = reference(logits, **{"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                             **params})
    assert unsure.sum() <= 100  # the comparison below still covers the other 201k decisions
    sure = ~unsure & ((ref > 1e-35) | ~mask)  # float32 weights below ~1e-38 are 0
    np.testing.assert_array_equal((got > 0)[sure], mask[sure])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-9)


def test_edge_cases_keep_exactly_what_they_should():
    logits = np.array([1.0, 3.0, 2.0, 3.0, -np.inf, 0.5], dtype=np.float32)
    kept = lambda **kw: np.flatnonzero(probabilities(logits, **kw)).tolist()  # noqa: E731
    assert kept(top_p=1e-6) == [1]  # the first of the two maxima
    assert kept(top_k=1) == [1]
    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=3) == [1, 2, 3]
    assert kept(top_k=6) == kept() == [0, 1, 2, 3, 5]  # -inf never
    assert kept(min_p=1.0) == [1, 3]
    assert kept(min_p=1.0, temperature=100.0) == [1, 3]  # near-equal probabilities are not equal
    assert probabilities(logits, temperature=0).tolist() == [0, 1, 0, 0, 0, 0]
    np.testing.assert_allclose(probabilities(logits, min_p=1.0)[[1, 3]], [0.5, 0.5])
    # Exactly two equal tokens and top_p = 0.5: the first reaches the mass, the tie goes to the lower id.
    assert np.flatnonzero(probabilities(np.zeros(4, np.float32), top_p=0.5)).tolist() == [0, 1]
    assert np.flatnonzero(probabilities(np.zeros(2, np.float32), top_p=0.5)).tolist() == [0]
    # Ties at the top-k boundary: exactly k survive, lowest ids first.
    assert np.flatnonzero(probabilities(np.zeros(10, np.float32), top_k=3)).tolist() == [0, 1, 2]
    # A temperature far below float32 resolution is still finite and keeps only the maxima.
    assert kept(temperature=1e-300) == [1, 3]
    assert probabilities(np.array([7.0], np.float32), top_p=0.1, top_k=1, min_p=1.0).tolist() == [1.0]


def test_temperature_zero_is_argmax_without_randomness():
    rng = np.random.default_rng(0)
    s = Sampler(temperature=0, seed=1)
    state = s.rng.bit_generator.state
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        logits[rng.integers(0, 1000, 100)] = -np.inf
        assert s(logits) == int(np.argmax(logits))
    assert s(np.array([2.0, 5.0, -np.inf, 5.0], np.float32)) == 1  # first of the tied maxima
    assert s(np.array([-np.inf, -np.inf, -3.0], np.float32)) == 2
    assert s.rng.bit_generator.state == state  # greedy draws nothing


def test_seeds_reproduce_and_differ():
    logits = np.random.default_rng(1).standard_normal(5000).astype(np.float32)

    def draw(seed, **kw):
        sampler = Sampler(seed=seed, **kw)
        return [sampler(logits) for _ in range(200)]

    for kw in [{}, dict(top_p=0.95), dict(top_k=40, min_p=0.05)]:
        assert draw(3, **kw) == draw(3, **kw)
        assert draw(3, **kw) != draw(4, **kw)


@pytest.mark.parametrize("params", [{}, dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8), dict(min_p=0.2),
                                    dict(temperature=1.5, top_k=4, top_p=0.9, min_p=0.05)])
def test_draws_follow_the_distribution(params):
    logits = np.array([2.0, 1.5, 0.3, 1.0, -np.inf, 0.8], dtype=np.float32)
    probs = probabilities(logits, **params)
    s = Sampler(seed=11, **params)
    n = 20000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=6)
    kept = probs > 0
    assert counts.sum() == n and np.all(counts[~kept] == 0)  # excluded tokens never appear
    expected = n * probs[kept]
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    if kept.sum() > 1:
        assert chi2 < CHI2_999[int(kept.sum()) - 1]
    else:
        assert counts[kept].item() == n


def test_draw_inverts_the_cumulative_distribution_across_blocks():
    """The two-level draw (blocks of 1024, then tokens) equals a flat inverse CDF and never picks a zero weight."""
    rng = np.random.default_rng(2)
    w = np.zeros(5000, np.float32)
    hot = [0, 1023, 1024, 2047, 3000, 4999]
    w[hot] = [0.5, 1.0, 2.0, 0.25, 3.0, 1.25]
    cum = np.cumsum(w.astype(np.float64))
    for u in np.concatenate([rng.random(2000), [0.0, 1 - 2.0**-53, 0.5 / 8, 1.5 / 8]]):
        assert _draw(w, u) == min(int(np.searchsorted(cum, u * cum[-1], side="right")), 4999)
    assert _draw(w, 0.0) == 0 and _draw(w, 1 - 2.0**-53) == 4999
    w[4999] = 0  # the last token is now excluded: even u -> 1 lands on the last kept one
    assert _draw(w, 1 - 2.0**-53) == 3000
    w[0] = 0
    assert _draw(w, 0.0) == 1023


def test_draws_over_a_large_vocabulary_follow_the_distribution():
    logits = np.full(201088, -np.inf, np.float32)
    hot = np.array([3, 1500, 70000, 150001, 201087])
    logits[hot] = [0.0, 0.5, -0.5, 1.0, 0.2]
    probs = probabilities(logits)
    s = Sampler(seed=5)
    n = 3000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=logits.size)
    assert counts[hot].sum() == n
    chi2 = ((counts[hot] - n * probs[hot]) ** 2 / (n * probs[hot])).sum()
    assert chi2 < CHI2_999[4]


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(seed=-1), "seed"), (dict(seed="x"), "seed"),
])
def test_bad_parameters_name_themselves(kwargs, name):
    with pytest.raises(ParameterError, match=name):
        Sampler(**kwargs)
    sampling = {k: v for k, v in kwargs.items() if k != "seed"}
    if sampling:
        with pytest.raises(ParameterError, match=name):
            probabilities(np.zeros(3, np.float32), **sampling)
        with pytest.raises(ParameterError, match=name):
            check_params(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, **sampling})


@pytest.mark.parametrize("logits", [np.zeros((2, 3), np.float32), np.zeros(0, np.float32),
                                    np.array(["a", "b"]), np.array([0.0, np.nan], np.float32),
                                    np.array([0.0, np.inf], np.float32), np.full(3, -np.inf, np.float32)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bad_logits(logits, temperature):
    with pytest.raises(ParameterError, match="logits"):
        Sampler(temperature=temperature)(logits)
    with pytest.raises(ParameterError, match="logits"):
        probabilities(logits, temperature=temperature)
