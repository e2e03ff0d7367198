"""Sampling: the distributions after temperature / top-k / top-p / min-p against brute force from the definitions,
seeded draws, and what excluded tokens never do."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ossrt.errors import ParameterError
from ossrt.sampling import Sampler, probabilities


def brute_force(logits, temperature, top_p, top_k, min_p):
    """Straight from the definitions, on the whole sorted vocabulary (HF order: temperature, k, p, min-p)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep = order[:top_k] if top_k else order
    if top_p < 1:
        mass = sum(p[i] for i in keep)
        prefix, cum = [], 0.0
        for i in keep:
            prefix.append(i)
            cum += p[i]
            if cum >= top_p * mass:
                break
        keep = prefix
    if min_p > 0:
        top = max(p[i] for i in keep)
        keep = [i for i in keep if p[i] >= min_p * top]
    out = np.zeros(len(p))
    out[keep] = p[keep]
    return out / out.sum()


@settings(max_examples=300, deadline=None)
@given(logits=st.lists(st.floats(-20, 20), min_size=1, max_size=40),
       temperature=st.floats(0.05, 3), top_p=st.one_of(st.just(1.0), st.floats(0.01, 0.99)),
       top_k=st.integers(0, 10), min_p=st.one_of(st.just(0.0), st.floats(0.01, 1.0)))
def test_probabilities_equal_brute_force(logits, temperature, top_p, top_k, min_p):
    got = probabilities(np.array(logits, dtype=np.float32), temperature=temperature, top_p=top_p, top_k=top_k,
                        min_p=min_p)
    expect = brute_force(np.array(logits, dtype=np.float32), temperature, top_p, top_k, min_p)
    np.testing.assert_allclose(got, expect, atol=1e-12)


def test_edge_cases_keep_exactly_what_they_should():
    logits = np.array([1.0, 3.0, 2.0, 3.0, -np.inf, 0.5], dtype=np.float32)
    assert np.flatnonzero(probabilities(logits, top_p=1e-6)).tolist() == [1]  # the first of the two maxima
    assert np.flatnonzero(probabilities(logits, top_k=1)).tolist() == [1]
    assert np.flatnonzero(probabilities(logits, top_k=3)).tolist() == [1, 2, 3]
    assert np.flatnonzero(probabilities(logits, min_p=1.0)).tolist() == [1, 3]
    assert probabilities(logits)[4] == 0  # -inf never
    assert probabilities(logits, temperature=0).tolist() == [0, 1, 0, 0, 0, 0]


def test_temperature_zero_is_argmax_without_randomness():
    rng = np.random.default_rng(0)
    s = Sampler(temperature=0, seed=1)
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        logits[rng.integers(0, 1000, 100)] = -np.inf
        assert s(logits) == int(np.argmax(logits))
    assert s(np.array([2.0, 5.0, 5.0], np.float32)) == 1


def test_seeds_reproduce_and_differ():
    logits = np.random.default_rng(1).standard_normal(5000).astype(np.float32)

    def draw(seed):
        sampler = Sampler(top_p=0.95, seed=seed)
        return [sampler(logits) for _ in range(200)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


@pytest.mark.parametrize("kwargs", [{}, dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8), dict(min_p=0.2),
                                    dict(temperature=1.5, top_k=4, top_p=0.9, min_p=0.05)])
def test_draws_follow_the_distribution(kwargs):
    logits = np.array([2.0, 1.5, 0.3, 1.0, -1.0, 0.8], dtype=np.float32)
    probs = probabilities(logits, **kwargs)
    s = Sampler(seed=11, **kwargs)
    n = 20000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=6)
    assert np.all(counts[probs == 0] == 0)  # excluded tokens never appear
    kept = probs > 0
    # Each frequency within 5 standard deviations of its binomial expectation.
    sd = np.sqrt(n * probs[kept] * (1 - probs[kept])) + 1e-9
    assert np.all(np.abs(counts[kept] - n * probs[kept]) < 5 * sd + 1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
])
def test_bad_parameters_name_themselves(kwargs, name):
    with pytest.raises(ParameterError, match=name):
        Sampler(**kwargs)


def test_bad_logits():
    with pytest.raises(ParameterError, match="logits"):
        Sampler()(np.zeros((2, 3), np.float32))
