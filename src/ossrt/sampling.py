"""Choosing the next token from logits: greedy, or a seeded draw after temperature, top-k, top-p and min-p.

Order as in Hugging Face transformers and mlx-lm: scale by 1/temperature, then top-k, then top-p, then min-p,
then renormalise. Only the candidates that survive top-k (or, without it, the tokens above a cheap probability
floor) are sorted, so a 201,088-entry vocabulary costs about a millisecond.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ParameterError


def check_params(*, temperature: float, top_p: float, top_k: int, min_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ParameterError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ParameterError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ParameterError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise ParameterError(f"min_p must be in [0, 1], got {min_p!r}")


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ParameterError(f"logits must be a non-empty vector, got shape {logits.shape}")
    return logits


def probabilities(logits: np.ndarray, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  min_p: float = 0.0) -> np.ndarray:
    """The sampling distribution (float64 over the whole vocabulary, zero for excluded tokens). Temperature 0
    puts all mass on the first largest logit. Ties at the top-k boundary keep the lower ids (a stable sort)."""
    check_params(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    logits = _check_logits(logits).astype(np.float64)
    probs = np.zeros(logits.size)
    if temperature == 0:
        probs[int(np.argmax(logits))] = 1.0
        return probs
    z = logits / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if not top_k and top_p == 1 and min_p == 0:
        return p
    # Candidates in order of falling probability (ties: lower id first).
    if top_k and top_k < p.size:
        part = np.argpartition(-p, top_k - 1)[:top_k]
        threshold = p[part].min()
        cand = np.flatnonzero(p >= threshold)  # every tie at the boundary, sorted below, cut to k
    else:
        # Tokens below 1e-12 of the maximum are left out of the sort: top-p < 1 or min-p > 0 would drop them.
        cand = np.flatnonzero(p >= p.max() * 1e-12)
    cand = cand[np.argsort(-p[cand], kind="stable")]
    if top_k:
        cand = cand[:top_k]
    if top_p < 1:
        cum = np.cumsum(p[cand])
        mass = cum[-1] if top_k else 1.0  # after top-k, top-p applies to the renormalised survivors (as in HF)
        cand = cand[: int(np.searchsorted(cum, top_p * mass)) + 1]  # the smallest prefix reaching top_p
    if min_p > 0:
        cand = cand[p[cand] >= min_p * p[cand[0]]]
    probs[cand] = p[cand]
    return probs / probs.sum()


class Sampler:
    """`Sampler(temperature, top_p, top_k, min_p, seed)(logits) -> token id`; the same seed gives the same ids."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None):
        check_params(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(_check_logits(logits)))
        probs = probabilities(logits, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p)
        cum = np.cumsum(probs)
        return int(min(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"), probs.size - 1))
