"""Choosing the next token from logits: greedy, or a seeded draw after temperature, top-k, top-p and min-p.

Order as in Hugging Face transformers: scale by 1/temperature, then top-k, then top-p (on the renormalised top-k
survivors), then min-p, then renormalise. Tokens are ranked by logit, ties lowest id first; only the candidates
that can survive are sorted (argpartition finds them), so a 201,088-entry vocabulary costs about a millisecond.
exp runs in float32 (ten times faster than float64 in NumPy); sums and cumulative sums run in float64.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ParameterError

# A positive temperature below float32's smallest number would divide by zero in float32.
_MIN_TEMPERATURE = float(np.finfo(np.float32).smallest_subnormal)
# Draws invert the distribution in two levels, blocks then tokens: a cumulative sum runs in sequence, ~1 ms over
# a whole 201k vocabulary.
_DRAW_BLOCK = 1024
# Top-p without top-k first sorts this many of the largest logits, then 16 times more until the mass is reached.
_NUCLEUS_START = 1024


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool (True is an int in Python, but never meant as a count or an id)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_float(value) -> float | None:
    """The number as a finite float, or None (not a number, a bool, NaN, infinite, or too large for a float)."""
    if not (is_integer(value) or isinstance(value, (float, np.floating))):
        return None
    try:
        x = float(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        return None
    return x if math.isfinite(x) else None


def check_params(*, temperature: float, top_p: float, top_k: int, min_p: float) -> None:
    """Raise ParameterError naming the first sampling parameter that is out of range."""
    t = _as_float(temperature)
    if t is None or t < 0:
        raise ParameterError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r:.80}")
    p = _as_float(top_p)
    if p is None or not 0 < p <= 1:
        raise ParameterError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r:.80}")
    if not is_integer(top_k) or top_k < 0:
        raise ParameterError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r:.80}")
    m = _as_float(min_p)
    if m is None or not 0 <= m <= 1:
        raise ParameterError(f"min_p must be a number in [0, 1] (0 = off), got {min_p!r:.80}")


def check_seed(seed: int | None) -> None:
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise ParameterError(f"seed must be an integer >= 0 or None, got {seed!r:.80}")


def _check_logits(logits: np.ndarray) -> tuple[np.ndarray, np.float32]:
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ParameterError(f"logits must be a non-empty 1-D vector, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ParameterError(f"logits must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    top = x.max()  # NaN anywhere makes this NaN
    if not np.isfinite(top):
        raise ParameterError(f"logits must have a finite maximum (no NaN or +inf, not all -inf), got max {top}")
    return x, top


def _largest_first(x: np.ndarray, n: int) -> np.ndarray:
    """Ids of every token whose logit is at least the n-th largest, by falling logit, ties lowest id first."""
    if n < x.size:
        ids = np.flatnonzero(x >= np.partition(x, x.size - n)[x.size - n])  # all ties at the n-th value too
    else:
        ids = np.arange(x.size)
    return ids[np.argsort(-x[ids], kind="stable")]


def _weights(x: np.ndarray, top: np.float32, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(scaled logits minus their maximum, unnormalised probabilities); the maximum has weight exactly 1."""
    with np.errstate(over="ignore"):  # a tiny temperature sends far logits to -inf, as it should
        z = (x - top) / max(temperature, _MIN_TEMPERATURE)
    return z, np.exp(z)


def _kept(x: np.ndarray, top: np.float32, temperature: float, top_p: float, top_k: int,
          min_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """The surviving token ids (None: the whole vocabulary in id order) and their unnormalised weights."""
    if top_k and top_k < x.size:
        ids = _largest_first(x, top_k)[:top_k]
        z, w = _weights(x[ids], top, temperature)
        if top_p < 1:
            cum = np.cumsum(w, dtype=np.float64)
            ids, z, w = (a[: _nucleus_size(cum, top_p * cum[-1])] for a in (ids, z, w))
    elif top_p < 1:
        z_all, w_all = _weights(x, top, temperature)
        goal = top_p * w_all.sum(dtype=np.float64)
        n = _NUCLEUS_START
        while True:  # grow the sorted prefix until it holds the nucleus
            ids = _largest_first(x, n)
            cum = np.cumsum(w_all[ids], dtype=np.float64)
            if cum[-1] >= goal or ids.size == x.size:
                break
            n *= 16
        ids = ids[: _nucleus_size(cum, goal)]
        z, w = z_all[ids], w_all[ids]
    else:
        ids = None
        z, w = _weights(x, top, temperature)
    if min_p > 0:
        # p >= min_p * max p, compared as log-ratios so that min_p = 1 keeps exactly the maximal logits.
        keep = z >= math.log(min_p)
        ids = np.flatnonzero(keep) if ids is None else ids[keep]
        w = w[keep]
    return ids, w


def _nucleus_size(cum: np.ndarray, goal: float) -> int:
    """Length of the shortest prefix whose cumulative weight reaches goal (at least 1, at most all)."""
    return min(int(np.searchsorted(cum, goal)) + 1, cum.size)


def _draw(w: np.ndarray, u: float) -> int:
    """The index i with sum(w[:i]) <= u * sum(w) < sum(w[:i + 1]) for u in [0, 1); never a zero weight."""
    sums = np.add.reduceat(w, np.arange(0, w.size, _DRAW_BLOCK), dtype=np.float64)
    cum = np.cumsum(sums)
    target = u * cum[-1]
    b = int(np.searchsorted(cum, target, side="right"))
    if b == cum.size:  # u * total rounded up to the total
        b = int(np.flatnonzero(sums)[-1])
    block = w[b * _DRAW_BLOCK:(b + 1) * _DRAW_BLOCK]
    inner = np.cumsum(block, dtype=np.float64)
    j = int(np.searchsorted(inner, target - (cum[b - 1] if b else 0.0), side="right"))
    if j == inner.size:  # the block's sum and its cumulative sum round differently
        j = int(np.flatnonzero(block)[-1])
    return b * _DRAW_BLOCK + j


def probabilities(logits: np.ndarray, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  min_p: float = 0.0) -> np.ndarray:
    """The sampling distribution: float64 over the whole vocabulary, zero for excluded tokens, summing to 1.
    Temperature 0 puts all mass on the first largest logit. Ties at the top-k boundary keep the lowest ids."""
    check_params(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    x, top = _check_logits(logits)
    probs = np.zeros(x.size)
    if temperature == 0:
        probs[int(np.argmax(x))] = 1.0
        return probs
    ids, w = _kept(x, top, temperature, top_p, top_k, min_p)
    probs[slice(None) if ids is None else ids] = w
    return probs / probs.sum()


class Sampler:
    """`Sampler(temperature, top_p, top_k, min_p, seed)(logits) -> token id`; the same seed gives the same ids.

    Temperature 0 is greedy (first largest logit) and draws nothing from the generator. Otherwise each call draws
    one uniform number and inverts the cumulative distribution of `probabilities()`."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None):
        check_params(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        check_seed(seed)
        self.temperature, self.top_p, self.top_k, self.min_p = float(temperature), float(top_p), int(top_k), \
            float(min_p)
        self.rng = np.random.default_rng(None if seed is None else int(seed))

    def __call__(self, logits: np.ndarray) -> int:
        x, top = _check_logits(logits)
        if self.temperature == 0:
            return int(np.argmax(x))
        ids, w = _kept(x, top, self.temperature, self.top_p, self.top_k, self.min_p)
        i = _draw(w, self.rng.random())
        return i if ids is None else int(ids[i])
