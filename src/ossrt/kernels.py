"""CPU kernels over the packed weights of a model file: Numba for the hot loops, BLAS for prefill.

Weights stay as they are in the file (MXFP4 experts, Q8_0/BF16/F16/F32 matrices); decode kernels dequantize each
block in registers as they go, prefill dequantizes tiles of rows and hands them to BLAS. Activations and
accumulation are float32. Every public function checks shapes and types in Python before a kernel touches memory.

`w` arguments are `ossrt.modelfile.Tensor`s (`.type`, NumPy-order `.shape`, raw memory-mapped `.data`).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit, prange

from . import mxfp4

# Reassociation lets LLVM vectorize the dot-product reductions; results differ from NumPy only in rounding order.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# Lookup tables, frozen into the compiled kernels as constants.
_KVALUES = mxfp4.KVALUES.astype(np.float32)  # doubled E2M1 table of ggml
_E8M0_HALF = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - 128).astype(np.float32)  # 2^(e-128)
_F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_BF16_TO_F32 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)

Q8_0_BLOCK = 34  # f16 scale + 32 int8
_TILE_BYTES = 16 << 20  # f32 tile size for prefill matmuls


def set_num_threads(n: int | None) -> int:
    """Threads for the Numba kernels (None = all cores); returns the number in use."""
    n = numba.config.NUMBA_NUM_THREADS if n is None else int(n)
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
    return n


# --- dequantization ------------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _dequant_mxfp4(w, out):
    n_blocks = out.shape[1] // 32
    for r in prange(w.shape[0]):
        for b in range(n_blocks):
            o = b * 17
            d = _E8M0_HALF[w[r, o]]
            for j in range(16):
                q = w[r, o + 1 + j]
                out[r, b * 32 + j] = _KVALUES[q & 15] * d
                out[r, b * 32 + 16 + j] = _KVALUES[q >> 4] * d


@njit(parallel=True, cache=True)
def _dequant_q8_0(w, out):
    n_blocks = out.shape[1] // 32
    for r in prange(w.shape[0]):
        for b in range(n_blocks):
            o = b * Q8_0_BLOCK
            d = _F16_TO_F32[np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8)]
            for j in range(32):
                out[r, b * 32 + j] = np.float32(np.int8(w[r, o + 2 + j])) * d


def _dequant_rows(w, data: np.ndarray, out: np.ndarray) -> None:
    """Raw rows of `w`'s type → float32 `out` [rows, n]."""
    if w.type == GGMLType.MXFP4:
        _dequant_mxfp4(data, out)
    elif w.type == GGMLType.Q8_0:
        _dequant_q8_0(data, out)
    elif w.type == GGMLType.BF16:
        out[...] = (data.astype(np.uint32) << 16).view(np.float32)
    else:  # F32, F16
        out[...] = data


def _check_type(w) -> None:
    if w.type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.MXFP4):
        raise ValueError(f"{w.name}: unsupported tensor type {w.type.name}")


def dequantize(w, rows=None) -> np.ndarray:
    """Dense float32 of `w` (logical shape), or of the selected rows along its first axis."""
    _check_type(w)
    data = w.data
    shape = w.shape
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= shape[0])):
            raise ValueError(f"{w.name}: rows must be a 1-D array of indices below {shape[0]}")
        data = data[rows]
        shape = (len(rows),) + tuple(shape[1:])
    n = shape[-1]
    out = np.empty((int(np.prod(shape[:-1], dtype=np.int64)), n), dtype=np.float32)
    _dequant_rows(w, np.ascontiguousarray(data).reshape(out.shape[0], -1), out)
    return out.reshape(shape)


# --- matrix-vector (decode) ----------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matvec_mxfp4(w, x, out):
    n_blocks = x.shape[0] // 32
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for b in range(n_blocks):
            o = b * 17
            s = np.float32(0.0)
            for j in range(16):
                q = w[r, o + 1 + j]
                s += _KVALUES[q & 15] * x[b * 32 + j] + _KVALUES[q >> 4] * x[b * 32 + 16 + j]
            acc += s * _E8M0_HALF[w[r, o]]
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matvec_q8_0(w, x, out):
    n_blocks = x.shape[0] // 32
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for b in range(n_blocks):
            o = b * Q8_0_BLOCK
            s = np.float32(0.0)
            for j in range(32):
                s += np.float32(np.int8(w[r, o + 2 + j])) * x[b * 32 + j]
            acc += s * _F16_TO_F32[np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8)]
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matvec_16bit(w, table, x, out):
    """BF16 or F16 rows (uint16 bit patterns) through a 65536-entry conversion table."""
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += table[w[r, i]] * x[i]
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matvec_f32(w, x, out):
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += w[r, i] * x[i]
        out[r] = acc


def _check_matrix(w, n_in: int) -> None:
    _check_type(w)
    if len(w.shape) != 2:
        raise ValueError(f"{w.name}: expected a matrix, got shape {w.shape}")
    if w.shape[1] != n_in:
        raise ValueError(f"{w.name}: input size {n_in} does not match the tensor's {w.shape[1]}")
    if w.type in (GGMLType.MXFP4, GGMLType.Q8_0) and n_in % 32:
        raise ValueError(f"{w.name}: rows of {n_in} values are not whole blocks of 32")


def matvec(w, x: np.ndarray) -> np.ndarray:
    """`W @ x` for a 2-D weight of any supported type; x float32 [in] → float32 [out]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"{w.name}: matvec needs a vector, got shape {x.shape}")
    _check_matrix(w, x.shape[0])
    out = np.empty(w.shape[0], dtype=np.float32)
    if w.type == GGMLType.MXFP4:
        _matvec_mxfp4(w.data, x, out)
    elif w.type == GGMLType.Q8_0:
        _matvec_q8_0(w.data, x, out)
    elif w.type == GGMLType.BF16:
        _matvec_16bit(w.data, _BF16_TO_F32, x, out)
    elif w.type == GGMLType.F16:
        _matvec_16bit(w.data.view(np.uint16), _F16_TO_F32, x, out)
    else:
        _matvec_f32(w.data, x, out)
    return out


# --- matrix-matrix (prefill) ---------------------------------------------------------------------------------------
def matmul(w, X: np.ndarray) -> np.ndarray:
    """`X @ W.T` for X float32 [T, in] → float32 [T, out]: dequantize tiles of rows, multiply with BLAS."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{w.name}: matmul needs a matrix of activations, got shape {X.shape}")
    _check_matrix(w, X.shape[1])
    n_out, n_in = w.shape
    out = np.empty((X.shape[0], n_out), dtype=np.float32)
    if w.type == GGMLType.F32:
        np.dot(X, w.data.T, out=out)
        return out
    step = max(1, _TILE_BYTES // (4 * n_in))
    tile = np.empty((min(step, n_out), n_in), dtype=np.float32)
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        t = tile[: r1 - r0]
        _dequant_rows(w, w.data[r0:r1], t)
        out[:, r0:r1] = X @ t.T
    return out


def linear(w, X: np.ndarray) -> np.ndarray:
    """`X @ W.T` for X [T, in]: the decode kernel for one row, tiles and BLAS for more."""
    if X.ndim == 2 and X.shape[0] == 1:
        return matvec(w, X[0])[None]
    return matmul(w, X)


# --- mixture of experts ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _swiglu(g, u, alpha, limit):
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return g / (np.float32(1.0) + np.exp(-alpha * g)) * (u + np.float32(1.0))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _moe_assignments(X, tok, exp, wt, gate, up, down, gate_b, up_b, down_b, alpha, limit, out):
    """out[tok[a]] += wt[a] * expert exp[a] applied to X[tok[a]], for each assignment a; MXFP4 rows decoded in
    registers, gate and up read together. `out` rows must start at zero."""
    n_assign = tok.shape[0]
    n_ff = gate.shape[1]
    n_embd = X.shape[1]
    act = np.empty((n_assign, n_ff), dtype=np.float32)
    for ar in prange(n_assign * n_ff):
        a = ar // n_ff
        r = ar - a * n_ff
        e = exp[a]
        x = X[tok[a]]
        g = np.float32(0.0)
        u = np.float32(0.0)
        for b in range(n_embd // 32):
            o = b * 17
            sg = np.float32(0.0)
            su = np.float32(0.0)
            for j in range(16):
                qg = gate[e, r, o + 1 + j]
                qu = up[e, r, o + 1 + j]
                x0 = x[b * 32 + j]
                x1 = x[b * 32 + 16 + j]
                sg += _KVALUES[qg & 15] * x0 + _KVALUES[qg >> 4] * x1
                su += _KVALUES[qu & 15] * x0 + _KVALUES[qu >> 4] * x1
            g += sg * _E8M0_HALF[gate[e, r, o]]
            u += su * _E8M0_HALF[up[e, r, o]]
        act[a, r] = _swiglu(g + gate_b[e, r], u + up_b[e, r], alpha, limit)
    # Parallel over output rows, so every output element has one writer.
    for r in prange(n_embd):
        for a in range(n_assign):
            e = exp[a]
            y = np.float32(0.0)
            for b in range(n_ff // 32):
                o = b * 17
                s = np.float32(0.0)
                for j in range(16):
                    q = down[e, r, o + 1 + j]
                    s += _KVALUES[q & 15] * act[a, b * 32 + j] + _KVALUES[q >> 4] * act[a, b * 32 + 16 + j]
                y += s * _E8M0_HALF[down[e, r, o]]
            out[tok[a], r] += wt[a] * (y + down_b[e, r])


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _swiglu_rows(G, U, alpha, limit, out):
    for t in prange(G.shape[0]):
        for i in range(G.shape[1]):
            out[t, i] = _swiglu(G[t, i], U[t, i], alpha, limit)


def moe(gate_exps, up_exps, down_exps, gate_b: np.ndarray, up_b: np.ndarray, down_b: np.ndarray, X: np.ndarray,
        expert_ids: np.ndarray, expert_weights: np.ndarray, *, alpha: float = 1.702, limit: float = 7.0,
        dense_min_tokens: int = 2) -> np.ndarray:
    """Σ over each token's selected experts of weight · (down · swiglu(gate·x + b_g, up·x + b_u) + b_d).

    X float32 [T, H]; expert_ids int [T, k]; expert_weights float32 [T, k]; MXFP4 gate/up (E, I, H), down (E, H, I).
    An expert chosen by at least `dense_min_tokens` tokens is dequantized once and multiplied with BLAS; the
    rest go through the fused kernel that decodes the packed rows in registers (all of decode).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    T, H = X.shape
    E, I = gate_exps.shape[0], gate_exps.shape[1]
    for w, shape in ((gate_exps, (E, I, H)), (up_exps, (E, I, H)), (down_exps, (E, H, I))):
        if w.type != GGMLType.MXFP4 or tuple(w.shape) != shape:
            raise ValueError(f"{w.name}: expected MXFP4 experts of shape {shape}, got {w.type.name} {w.shape}")
    if H % 32 or I % 32:
        raise ValueError(f"expert sizes {H}, {I} are not whole blocks of 32")
    for b, shape, name in ((gate_b, (E, I), "gate bias"), (up_b, (E, I), "up bias"), (down_b, (E, H), "down bias")):
        if b.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {b.shape}")
    expert_ids = np.asarray(expert_ids, dtype=np.int64)
    expert_weights = np.asarray(expert_weights, dtype=np.float32)
    if expert_ids.ndim != 2 or expert_ids.shape[0] != T or expert_weights.shape != expert_ids.shape:
        raise ValueError(f"expert ids {expert_ids.shape} / weights {expert_weights.shape} do not match {T} tokens")
    if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= E):
        raise ValueError(f"expert ids must lie in [0, {E})")
    alpha, limit = np.float32(alpha), np.float32(limit)
    gate_b, up_b, down_b = (np.ascontiguousarray(b, dtype=np.float32) for b in (gate_b, up_b, down_b))

    out = np.zeros((T, H), dtype=np.float32)
    tok = np.repeat(np.arange(T, dtype=np.int64), expert_ids.shape[1])
    exp, wt = expert_ids.reshape(-1), expert_weights.reshape(-1)
    counts = np.bincount(exp, minlength=E)
    sparse = counts[exp] < dense_min_tokens
    if sparse.any():
        _moe_assignments(X, tok[sparse], exp[sparse], wt[sparse], gate_exps.data, up_exps.data, down_exps.data,
                         gate_b, up_b, down_b, alpha, limit, out)
    dense_experts = np.flatnonzero(counts >= dense_min_tokens)
    if dense_experts.size:
        w_gate = np.empty((I, H), dtype=np.float32)
        w_up = np.empty((I, H), dtype=np.float32)
        w_down = np.empty((H, I), dtype=np.float32)
        for e in dense_experts:
            sel = np.flatnonzero(exp == e)
            rows = tok[sel]
            _dequant_mxfp4(gate_exps.data[e], w_gate)
            _dequant_mxfp4(up_exps.data[e], w_up)
            _dequant_mxfp4(down_exps.data[e], w_down)
            xe = X[rows]
            act = np.empty((len(rows), I), dtype=np.float32)
            _swiglu_rows(xe @ w_gate.T + gate_b[e], xe @ w_up.T + up_b[e], alpha, limit, act)
            y = act @ w_down.T + down_b[e]
            out[rows] += wt[sel, None] * y  # rows are distinct: a token picks an expert at most once
    return out


# --- attention (decode) ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _attend(q, keys, values, first_slot, n_keys, sinks, scale, out):
    n_head, head_dim = q.shape
    capacity = keys.shape[1]
    per_kv = n_head // keys.shape[0]
    for h in prange(n_head):
        g = h // per_kv
        scores = np.empty(n_keys, dtype=np.float32)
        m = sinks[h]
        for j in range(n_keys):
            slot = (first_slot + j) % capacity
            s = np.float32(0.0)
            for i in range(head_dim):
                s += q[h, i] * keys[g, slot, i]
            s *= scale
            scores[j] = s
            m = max(m, s)
        denom = np.exp(sinks[h] - m)  # the sink widens the denominator and has no value
        acc = np.zeros(head_dim, dtype=np.float32)
        for j in range(n_keys):
            slot = (first_slot + j) % capacity
            p = np.exp(scores[j] - m)
            denom += p
            for i in range(head_dim):
                acc[i] += p * values[g, slot, i]
        for i in range(head_dim):
            out[h, i] = acc[i] / denom


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first_slot: int, n_keys: int, sinks: np.ndarray,
           scale: float) -> np.ndarray:
    """One query position against `n_keys` cached keys starting at ring slot `first_slot` (wrapping around the
    cache's capacity), with attention sinks. q [n_head, d]; keys/values [n_head_kv, capacity, d] → [n_head, d]."""
    n_head, d = q.shape
    n_kv, capacity = keys.shape[0], keys.shape[1]
    if keys.shape != (n_kv, capacity, d) or values.shape != keys.shape or n_head % n_kv or sinks.shape != (n_head,):
        raise ValueError(f"attention shapes do not fit: q {q.shape}, keys {keys.shape}, values {values.shape}, "
                         f"sinks {sinks.shape}")
    if not (0 < n_keys <= capacity and 0 <= first_slot < capacity):
        raise ValueError(f"{n_keys} keys from slot {first_slot} do not fit a cache of {capacity}")
    out = np.empty((n_head, d), dtype=np.float32)
    _attend(np.ascontiguousarray(q, dtype=np.float32), keys, values, first_slot, n_keys,
            np.ascontiguousarray(sinks, dtype=np.float32), np.float32(scale), out)
    return out
