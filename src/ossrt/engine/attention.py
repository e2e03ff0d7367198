"""Attention with sinks over the KV cache (spec §2.4): one Numba kernel for every storage type, for a few queries
(decode) or a block of queries (prefill).

The kernel works on float32 tiles of keys and values; how a tile is read from the cache is the one thing that
depends on the storage type: `_load_tile`, an `overload` Numba resolves from the arrays' dtype when it compiles the
kernel for that type (float32: a view of the cache; f16 bit patterns: converted; q8_0: int8 times each block's
scale). A tile is decoded once for all the query heads of its KV head (and, in a prompt, a tile of queries), its keys
transposed so that scores are vectors along the positions (`simd.tile_scores`), and the softmax runs over it online
(a running maximum, the sums rescaled when it grows), so no step holds more than one tile of scores.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .kernels import FEW_TOKENS
from .kv_cache import LayerKV
from .simd import (FASTMATH, TILE_POSITIONS, dequant_row_f16, dequant_row_q8_split, exp_nonpositive,
                   tile_max, tile_scores, tile_transpose, tile_values)

QUERY_TILE = 16  # a prompt's queries that (with all their KV head's query heads) share each decoded tile
KEY_TILE = TILE_POSITIONS  # positions a tile holds: a key and a value tile (16 KiB each at d = 64) stay in cache


def _load_tile(src, scales, g, slot, n, scratch):
    """src[g, slot:slot + n] (n contiguous slots) as float32 [n, d] (dispatched on src's dtype by the overload
    below)."""
    raise NotImplementedError


@overload(_load_tile, inline="always")
def _load_tile_typed(src, scales, g, slot, n, scratch):
    if src.dtype == types.float32:
        def load(src, scales, g, slot, n, scratch):
            return src[g, slot:slot + n]
    elif src.dtype == types.uint16:
        def load(src, scales, g, slot, n, scratch):
            for r in range(n):
                dequant_row_f16(src[g, slot + r], scratch[r])
            return scratch[:n]
    elif src.dtype == types.int8:
        def load(src, scales, g, slot, n, scratch):
            for r in range(n):
                dequant_row_q8_split(src[g, slot + r], scales[g, slot + r], scratch[r])
            return scratch[:n]
    else:
        return None
    return load


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _weigh(scores, j0, j1, m, denom, acc, i):
    """Query row i's online softmax meets positions j0..j1 of a tile, `scores` their logits: the running maximum
    m[i] grows to the tile's (the sums so far rescaled), denom[i] takes each position's exp(logit - m[i]), and
    `scores` becomes those weights (for `_add_values`)."""
    largest = tile_max(scores, j0, j1, m[i])
    if largest > m[i]:
        rescale = exp_nonpositive(m[i] - largest)
        denom[i] *= rescale
        for x in range(acc.shape[1]):
            acc[i, x] *= rescale
        m[i] = largest
    total = np.float32(0.0)
    weights = scores[j0:j1]  # indices from 0, known not negative: LLVM vectorizes the loop (not over j0..j1)
    for k in range(weights.shape[0]):
        weights[k] = exp_nonpositive(weights[k] - largest)
        total += weights[k]
    denom[i] += total


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _add_values(S, j0, j1, V, acc, r0, r1):
    """acc[r0] += S[0, j0:j1] @ V[j0:j1], and acc[r1] the same of S[1] unless r1 < 0 (`tile_values`, whole vectors of
    16; a head size's lanes past them here)."""
    tile_values(S, j0, j1, V, acc, r0, r1)
    for k, r in ((0, r0), (1, r1)):
        if r >= 0:
            for x in range(acc.shape[1] // 16 * 16, acc.shape[1]):
                for j in range(j0, j1):
                    acc[r, x] += S[k, j] * V[j, x]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _add_tile(Q, r, pair, KT, V, j0, j1, S, m, denom, acc):
    """Query rows r and, if `pair`, r + 1 meet positions j0..j1 of a tile of keys (transposed: KT) and values V."""
    tile_scores(Q, r, r + 1 if pair else r, KT, S)
    _weigh(S[0], j0, j1, m, denom, acc, r)
    if pair:
        _weigh(S[1], j0, j1, m, denom, acc, r + 1)
    _add_values(S, j0, j1, V, acc, r, r + 1 if pair else -1)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _transposed(K, n, KT):
    """KT[:, :n] = K[:n].T (`tile_transpose`, whole blocks of 16; the rest here)."""
    tile_transpose(K, n, KT)
    d, whole_rows, whole_columns = K.shape[1], n // 16 * 16, K.shape[1] // 16 * 16
    for j in range(n):
        for x in range(whole_columns if j < whole_rows else 0, d):
            KT[x, j] = K[j, x]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _attend(q, keys, key_scales, values, value_scales, start, window, sinks, scale, out):
    """out[t, h] = attention of q[t, h], the query at position start + t, over the keys and values of positions
    max(0, start + t - window + 1) .. start + t, held in slot position % capacity. An item is a tile of queries and
    one KV head: all the head's queries meet each tile of keys (transposed once, `tile_scores`) and values."""
    T, n_head, d = q.shape
    n_kv, capacity = keys.shape[0], keys.shape[1]
    per_kv = n_head // n_kv
    n_tiles = (T + QUERY_TILE - 1) // QUERY_TILE
    rows = QUERY_TILE * per_kv  # row (t - t0) * per_kv + i: query t, head g * per_kv + i
    for item in prange(n_kv * n_tiles):
        g = item % n_kv
        h0 = g * per_kv
        # Later queries see more keys: tiles taken from both ends in turn give each thread's share of the items
        # (consecutive, in Numba's schedule) about the same work.
        order = item // n_kv
        t0 = (order // 2 if order % 2 == 0 else n_tiles - 1 - order // 2) * QUERY_TILE
        t1 = min(T, t0 + QUERY_TILE)
        Q = np.empty((rows, d), dtype=np.float32)  # the queries, scaled
        m = np.empty(rows, dtype=np.float32)  # running maximum, from the sink's logit
        for t in range(t0, t1):
            for i in range(per_kv):
                r = (t - t0) * per_kv + i
                for x in range(d):
                    Q[r, x] = q[t, h0 + i, x] * scale
                m[r] = sinks[h0 + i]
        denom = np.ones(rows, dtype=np.float32)  # Σ exp(logit - m), the sink's share included
        acc = np.zeros((rows, d), dtype=np.float32)  # Σ exp(logit - m) · value: the sink has no value
        key_scratch = np.empty((KEY_TILE, d), dtype=np.float32)
        KT = np.zeros((d, KEY_TILE), dtype=np.float32)
        value_scratch = np.empty((KEY_TILE, d), dtype=np.float32)
        S = np.empty((2, KEY_TILE), dtype=np.float32)
        p0 = max(0, start + t0 - window + 1)  # the first position the tile's first query sees
        while p0 < start + t1:
            slot = p0 % capacity
            n = min(KEY_TILE, start + t1 - p0, capacity - slot)  # a tile never wraps around the ring
            _transposed(_load_tile(keys, key_scales, g, slot, n, key_scratch), n, KT)
            V = _load_tile(values, value_scales, g, slot, n, value_scratch)
            for t in range(t0, t1):
                j0 = max(p0, start + t - window + 1) - p0  # the query's positions within the tile
                j1 = min(n, start + t + 1 - p0)
                if j0 >= j1:
                    continue
                for i in range(0, per_kv, 2):
                    _add_tile(Q, (t - t0) * per_kv + i, i + 1 < per_kv, KT, V, j0, j1, S, m, denom, acc)
            p0 += n
        for t in range(t0, t1):
            for i in range(per_kv):
                r = (t - t0) * per_kv + i
                for x in range(d):
                    out[t, h0 + i, x] = acc[r, x] / denom[r]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _attend_few(q, keys, key_scales, values, value_scales, start, window, sinks, scale, out):
    """`_attend` for a few queries (decode: one), each on its own as if alone (drafted tokens are checked in such
    passes): an item per KV head, whose query heads all meet each tile of keys and values as it is decoded."""
    T, n_head, d = q.shape
    n_kv, capacity = keys.shape[0], keys.shape[1]
    per_kv = n_head // n_kv
    for g in prange(n_kv):
        h0 = g * per_kv
        Q = np.empty((per_kv, d), dtype=np.float32)  # the query's heads, scaled
        m = np.empty(per_kv, dtype=np.float32)  # running maximum per query head, from its sink's logit
        denom = np.empty(per_kv, dtype=np.float32)
        acc = np.empty((per_kv, d), dtype=np.float32)
        key_scratch = np.empty((KEY_TILE, d), dtype=np.float32)
        KT = np.zeros((d, KEY_TILE), dtype=np.float32)
        value_scratch = np.empty((KEY_TILE, d), dtype=np.float32)
        S = np.empty((2, KEY_TILE), dtype=np.float32)
        for t in range(T):
            position = start + t
            for i in range(per_kv):
                for x in range(d):
                    Q[i, x] = q[t, h0 + i, x] * scale
                m[i] = sinks[h0 + i]
            denom[:] = 1.0
            acc[:] = 0.0
            p0 = max(0, position - window + 1)
            while p0 <= position:
                slot = p0 % capacity
                n = min(KEY_TILE, position + 1 - p0, capacity - slot)
                _transposed(_load_tile(keys, key_scales, g, slot, n, key_scratch), n, KT)
                V = _load_tile(values, value_scales, g, slot, n, value_scratch)
                for i in range(0, per_kv, 2):
                    _add_tile(Q, i, i + 1 < per_kv, KT, V, 0, n, S, m, denom, acc)
                p0 += n
            for i in range(per_kv):
                for x in range(d):
                    out[t, h0 + i, x] = acc[i, x] / denom[i]


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
    kernel = _attend_few if T <= FEW_TOKENS else _attend
    kernel(np.ascontiguousarray(q, dtype=np.float32), kv.keys, kv.key_scales, kv.values, kv.value_scales, start,
            kv.window, np.ascontiguousarray(sinks, dtype=np.float32), np.float32(scale), out)
    return out
