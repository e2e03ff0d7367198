"""Attention with sinks over the KV cache (spec §2.4): one Numba kernel for every storage type, for one query
(decode) or a block of queries (prefill).

The kernel is written once; the two operations that depend on how the cache stores a vector (a dot product with a
key, adding a weighted value) are `overload`s that Numba resolves from the arrays' dtype when it compiles the kernel
for that type: float32, f16 bit patterns (uint16), or q8_0 (int8 with a float32 scale per 32).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .kv_cache import LayerKV
from .simd import F16_TO_F32, FASTMATH, Q8_0_BLOCK_SIZE, row_dot_f16


def _key_dot(keys, scales, g, slot, q):
    """q · keys[g, slot], float32 (dispatched on the keys' dtype by the overload below)."""
    raise NotImplementedError


def _add_value(acc, p, values, scales, g, slot):
    """acc += p · values[g, slot] (dispatched on the values' dtype by the overload below)."""
    raise NotImplementedError


# Inlined into the kernel, they take its fastmath flags, which let LLVM vectorize the sums.
@overload(_key_dot, inline="always")
def _key_dot_typed(keys, scales, g, slot, q):
    if keys.dtype == types.float32:
        def dot(keys, scales, g, slot, q):
            s = np.float32(0.0)
            for i in range(q.shape[0]):
                s += q[i] * keys[g, slot, i]
            return s
    elif keys.dtype == types.uint16:
        def dot(keys, scales, g, slot, q):
            return row_dot_f16(keys[g, slot], q)
    elif keys.dtype == types.int8:
        def dot(keys, scales, g, slot, q):
            s = np.float32(0.0)
            for b in range(q.shape[0] // Q8_0_BLOCK_SIZE):
                sb = np.float32(0.0)
                for i in range(b * Q8_0_BLOCK_SIZE, (b + 1) * Q8_0_BLOCK_SIZE):
                    sb += q[i] * np.float32(keys[g, slot, i])
                s += sb * scales[g, slot, b]
            return s
    else:
        return None
    return dot


@overload(_add_value, inline="always")
def _add_value_typed(acc, p, values, scales, g, slot):
    if values.dtype == types.float32:
        def add(acc, p, values, scales, g, slot):
            for i in range(acc.shape[0]):
                acc[i] += p * values[g, slot, i]
    elif values.dtype == types.uint16:
        def add(acc, p, values, scales, g, slot):
            for i in range(acc.shape[0]):
                acc[i] += p * F16_TO_F32[values[g, slot, i]]
    elif values.dtype == types.int8:
        def add(acc, p, values, scales, g, slot):
            for b in range(acc.shape[0] // Q8_0_BLOCK_SIZE):
                pb = p * scales[g, slot, b]
                for i in range(b * Q8_0_BLOCK_SIZE, (b + 1) * Q8_0_BLOCK_SIZE):
                    acc[i] += pb * np.float32(values[g, slot, i])
    else:
        return None
    return add


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _attend(q, keys, key_scales, values, value_scales, start, window, sinks, scale, out):
    """out[t, h] = attention of q[t, h], the query at position start + t, over the keys and values of positions
    max(0, start + t - window + 1) .. start + t, held in slot position % capacity."""
    T, n_head, d = q.shape
    capacity = keys.shape[1]
    per_kv = n_head // keys.shape[0]
    for th in prange(T * n_head):
        t = th // n_head
        h = th - t * n_head
        g = h // per_kv  # the query head's KV head
        position = start + t
        first = max(0, position - window + 1)
        n = position + 1 - first
        scores = np.empty(n, dtype=np.float32)
        m = sinks[h]
        slot = first % capacity
        for j in range(n):
            s = _key_dot(keys, key_scales, g, slot, q[t, h]) * scale
            scores[j] = s
            m = max(m, s)
            slot = slot + 1 if slot + 1 < capacity else 0
        denom = np.exp(sinks[h] - m)  # the sink widens the denominator and has no value
        acc = np.zeros(d, dtype=np.float32)
        slot = first % capacity
        for j in range(n):
            p = np.exp(scores[j] - m)
            denom += p
            _add_value(acc, p, values, value_scales, g, slot)
            slot = slot + 1 if slot + 1 < capacity else 0
        for i in range(d):
            out[t, h, i] = acc[i] / denom


def attend(q: np.ndarray, kv: LayerKV, start: int, sinks: np.ndarray, scale: float) -> np.ndarray:
    """Attention with sinks of queries q [T, n_head, d] at positions start.. over the keys and values `kv` holds,
    which must include these positions and the window before them. → float32 [T, n_head, d]."""
    T, n_head, d = q.shape
    n_kv, capacity = kv.keys.shape[0], kv.capacity
    if kv.keys.shape[2] != d or n_head % n_kv or sinks.shape != (n_head,):
        raise ValueError(f"attention shapes do not fit: q {q.shape}, keys {kv.keys.shape}, sinks {sinks.shape}")
    if not (0 <= start and kv.first_visible(start) + capacity >= start + T):
        raise ValueError(f"positions {kv.first_visible(start)}..{start + T - 1} do not fit {capacity} slots")
    out = np.empty((T, n_head, d), dtype=np.float32)
    _attend(np.ascontiguousarray(q, dtype=np.float32), kv.keys, kv.key_scales, kv.values, kv.value_scales, start,
            kv.window, np.ascontiguousarray(sinks, dtype=np.float32), np.float32(scale), out)
    return out
