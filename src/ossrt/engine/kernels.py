"""CPU kernels over the packed weights of a model file, in Numba.

Weights stay as they are in the file (MXFP4 experts, Q8_0/BF16/F16/F32 matrices); decode kernels dequantize each
block in registers as they go (`simd`), prefill decodes each row once for a tile of tokens. Activations and
accumulation are float32, unless the caller asks for 8-bit activations (`int8`): then prefill's matmuls and, in
decode, the MoE's experts and the Q8_0 matrices take integer products where the CPU has VNNI. Every public function
checks shapes and types in Python before a kernel touches memory. Attention, which reads the KV cache rather than
weights, is in `attention`.

`w` arguments are `ossrt.format.modelfile.Tensor`s (`.type`, NumPy-order `.shape`, raw memory-mapped `.data`).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGMLType
from numba import njit, prange

from . import int8
from .simd import (FASTMATH, MXFP4_BLOCK_SIZE, Q8_0_BLOCK_SIZE, bf16_to_f32, dequant_row_bf16, dequant_row_f16,
                   dequant_row_mxfp4, dequant_row_q8_0, row_dot_bf16, row_dot_f16, row_dot_mxfp4, row_dot_q8_0)


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
    n_blocks = out.shape[1] // MXFP4_BLOCK_SIZE
    for r in prange(w.shape[0]):
        dequant_row_mxfp4(w[r], out[r], n_blocks)


@njit(parallel=True, cache=True)
def _dequant_q8_0(w, out):
    n_blocks = out.shape[1] // Q8_0_BLOCK_SIZE
    for r in prange(w.shape[0]):
        dequant_row_q8_0(w[r], out[r], n_blocks)


def _dequant_rows(w, data: np.ndarray, out: np.ndarray) -> None:
    """Raw rows of `w`'s type → float32 `out` [rows, n]."""
    if w.type == GGMLType.MXFP4:
        _dequant_mxfp4(data, out)
    elif w.type == GGMLType.Q8_0:
        _dequant_q8_0(data, out)
    elif w.type == GGMLType.BF16:
        out[...] = bf16_to_f32(data)
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


# --- few tokens (decode) -------------------------------------------------------------------------------------------
# A pass of at most FEW_TOKENS tokens (decode: one; a check of drafted tokens: a few) streams each weight row once past
# all of them, each token's row dot being the one compiled code a pass of that token alone runs: every token's numbers
# are bit for bit those of a pass of it alone, so drafted tokens are checked against exactly the output one-token
# steps give. Each kernel adds the bias as it writes a row (a matrix without one gets zeros): in decode a separate
# NumPy add cost more than the row's own work once the weights had swept the caches.
FEW_TOKENS = 4


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvec_mxfp4(w, X, bias, out):
    n_blocks = X.shape[1] // MXFP4_BLOCK_SIZE
    for r in prange(w.shape[0]):
        for t in range(X.shape[0]):
            out[t, r] = row_dot_mxfp4(w[r], X[t], n_blocks) + bias[r]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvec_q8_0(w, X, bias, out):
    n_blocks = X.shape[1] // Q8_0_BLOCK_SIZE
    for r in prange(w.shape[0]):
        for t in range(X.shape[0]):
            out[t, r] = row_dot_q8_0(w[r], X[t], n_blocks) + bias[r]


@njit(cache=True)
def _quantize_for_q8_0(X, lanes):
    """The rows of X as int8.row_dot_q8_0 takes a vector."""
    T, n = X.shape
    slots = int8.vector_slots(n // Q8_0_BLOCK_SIZE, lanes, int8.Q8_0_BLOCK_LANES)
    xq = np.empty((T, n), dtype=np.int8)
    xs, xc = np.empty((T, slots), dtype=np.float32), np.empty((T, slots), dtype=np.int32)
    for t in range(T):
        int8.quantize_vector(X[t], lanes, int8.Q8_0_OFFSET, int8.Q8_0_BLOCK_LANES, xq[t], xs[t], xc[t])
    return xq, xs, xc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvec_q8_0_int8(w, X, lanes, bias, out):
    """`_matvec_q8_0` with 8-bit activations: each token quantized once, `lanes` int32 lanes at a time."""
    n_blocks = X.shape[1] // Q8_0_BLOCK_SIZE
    xq, xs, xc = _quantize_for_q8_0(X, lanes)
    for r in prange(w.shape[0]):
        for t in range(X.shape[0]):
            out[t, r] = int8.row_dot_q8_0(w[r], xq[t], xs[t], xc[t], n_blocks, lanes) + bias[r]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvec_bf16(w, X, bias, out):
    for r in prange(w.shape[0]):
        for t in range(X.shape[0]):
            out[t, r] = row_dot_bf16(w[r], X[t]) + bias[r]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvec_f16(w, X, bias, out):
    for r in prange(w.shape[0]):
        for t in range(X.shape[0]):
            out[t, r] = row_dot_f16(w[r], X[t]) + bias[r]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvec_f32(w, X, bias, out):
    for r in prange(w.shape[0]):
        for t in range(X.shape[0]):
            acc = np.float32(0.0)
            for i in range(X.shape[1]):
                acc += w[r, i] * X[t, i]
            out[t, r] = acc + bias[r]


def _check_matrix(w, n_in: int) -> None:
    _check_type(w)
    if len(w.shape) != 2:
        raise ValueError(f"{w.name}: expected a matrix, got shape {w.shape}")
    if w.shape[1] != n_in:
        raise ValueError(f"{w.name}: input size {n_in} does not match the tensor's {w.shape[1]}")
    block = GGML_QUANT_SIZES[w.type][0]
    if n_in % block:
        raise ValueError(f"{w.name}: rows of {n_in} values are not whole blocks of {block}")


def _int8_q8_0(w_type, int8_activations: bool) -> bool:
    """Whether a few tokens' product takes the 8-bit-activation kernel: only Q8_0 matrices do (the router's and any
    other type stay float32)."""
    return int8_activations and w_type == GGMLType.Q8_0 and int8.supports(w_type)


def matvec(w, x: np.ndarray, bias: np.ndarray | None = None, *, int8_activations: bool = False) -> np.ndarray:
    """`W @ x (+ bias)` for a 2-D weight of any supported type; x float32 [in] → float32 [out]. With
    `int8_activations`, a Q8_0 matrix on a VNNI CPU takes x quantized to 8 bits a value (as `matmul`)."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{w.name}: matvec needs a vector, got shape {x.shape}")
    return _few_tokens(w, x[None], bias, int8_activations)[0]


def _few_tokens(w, X: np.ndarray, bias: np.ndarray | None, int8_activations: bool) -> np.ndarray:
    """`X @ W.T (+ bias)` for a few tokens X [T, in] by the decode kernels."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    _check_matrix(w, X.shape[1])
    bias = _bias(w, bias)
    out = np.empty((X.shape[0], w.shape[0]), dtype=np.float32)
    if _int8_q8_0(w.type, int8_activations):
        _matvec_q8_0_int8(w.data, X, int8.decode_lanes(), bias, out)
    elif w.type == GGMLType.MXFP4:
        _matvec_mxfp4(w.data, X, bias, out)
    elif w.type == GGMLType.Q8_0:
        _matvec_q8_0(w.data, X, bias, out)
    elif w.type == GGMLType.BF16:
        _matvec_bf16(w.data, X, bias, out)
    elif w.type == GGMLType.F16:
        _matvec_f16(w.data.view(np.uint16), X, bias, out)
    else:
        _matvec_f32(w.data, X, bias, out)
    return out


def _bias(w, bias: np.ndarray | None) -> np.ndarray:
    """A matrix's bias as the kernels take it: float32 [rows], zeros for none."""
    if bias is None:
        return _zeros(w.shape[0])
    if bias.shape != (w.shape[0],):
        raise ValueError(f"{w.name}: a bias of shape {bias.shape} for {w.shape[0]} rows")
    return bias if bias.dtype == np.float32 and bias.flags.c_contiguous else np.ascontiguousarray(bias, np.float32)


@functools.cache
def _zeros(n: int) -> np.ndarray:
    """float32 zeros [n] (shared: read-only)."""
    a = np.zeros(n, dtype=np.float32)
    a.flags.writeable = False
    return a


@njit(cache=True, inline="always")
def _matrix_of(i, first_row):
    """Which matrix row i of several stacked ones falls in (matrix m holds rows first_row[m] to first_row[m + 1])."""
    m = 0
    while i >= first_row[m + 1]:
        m += 1
    return m


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvecs_q8_0(ws, first_row, X, biases, out):
    """out[t, first_row[m] + r] = row r of ws[m] · X[t] + biases[m][r]: the rows of every matrix in one parallel
    pass."""
    n_blocks = X.shape[1] // Q8_0_BLOCK_SIZE
    for i in prange(out.shape[1]):
        m = _matrix_of(i, first_row)
        for t in range(X.shape[0]):
            out[t, i] = row_dot_q8_0(ws[m][i - first_row[m]], X[t], n_blocks) + biases[m][i - first_row[m]]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvecs_q8_0_int8(ws, first_row, X, lanes, biases, out):
    """`_matvecs_q8_0` with 8-bit activations (`_matvec_q8_0_int8`)."""
    n_blocks = X.shape[1] // Q8_0_BLOCK_SIZE
    xq, xs, xc = _quantize_for_q8_0(X, lanes)
    for i in prange(out.shape[1]):
        m = _matrix_of(i, first_row)
        for t in range(X.shape[0]):
            out[t, i] = (int8.row_dot_q8_0(ws[m][i - first_row[m]], xq[t], xs[t], xc[t], n_blocks, lanes)
                         + biases[m][i - first_row[m]])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matvecs_bf16(ws, first_row, X, biases, out):
    """`_matvecs_q8_0` for BF16 matrices."""
    for i in prange(out.shape[1]):
        m = _matrix_of(i, first_row)
        for t in range(X.shape[0]):
            out[t, i] = row_dot_bf16(ws[m][i - first_row[m]], X[t]) + biases[m][i - first_row[m]]


_MATVECS = {GGMLType.Q8_0: _matvecs_q8_0, GGMLType.BF16: _matvecs_bf16}


# --- matrix-matrix (prefill) ---------------------------------------------------------------------------------------
# Each kernel decodes one weight row into float32 once, then multiplies it with every token of a tile small enough
# to stay in cache. No BLAS: its threads and Numba's would spin against each other on few cores.
_TOKEN_TILE = 64


@njit(cache=True, inline="always")
def _rows_times_tokens(rows, n_rows, X, out, r0):
    """out[t, r0 + k] = rows[k] · X[t] for k < n_rows and every token. Four rows by four tokens per pass: each
    loaded value feeds four sums, and the sixteen sums fit in registers. Inlined, it takes its caller's fastmath
    flags, which let LLVM vectorize the sums."""
    T, H = X.shape
    t = 0  # tokens before t are done
    if n_rows == 4:
        while t + 4 <= T:
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
            for j in range(H):
                u, v, p, q = rows[0, j], rows[1, j], rows[2, j], rows[3, j]
                x0, x1, x2, x3 = X[t, j], X[t + 1, j], X[t + 2, j], X[t + 3, j]
                a0 += u * x0
                a1 += u * x1
                a2 += u * x2
                a3 += u * x3
                b0 += v * x0
                b1 += v * x1
                b2 += v * x2
                b3 += v * x3
                c0 += p * x0
                c1 += p * x1
                c2 += p * x2
                c3 += p * x3
                d0 += q * x0
                d1 += q * x1
                d2 += q * x2
                d3 += q * x3
            out[t, r0], out[t + 1, r0], out[t + 2, r0], out[t + 3, r0] = a0, a1, a2, a3
            out[t, r0 + 1], out[t + 1, r0 + 1], out[t + 2, r0 + 1], out[t + 3, r0 + 1] = b0, b1, b2, b3
            out[t, r0 + 2], out[t + 1, r0 + 2], out[t + 2, r0 + 2], out[t + 3, r0 + 2] = c0, c1, c2, c3
            out[t, r0 + 3], out[t + 1, r0 + 3], out[t + 2, r0 + 3], out[t + 3, r0 + 3] = d0, d1, d2, d3
            t += 4
    for k in range(n_rows):
        for t1 in range(t, T):
            s = np.float32(0.0)
            for j in range(H):
                s += rows[k, j] * X[t1, j]
            out[t1, r0 + k] = s


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matmul_mxfp4(w, X, out):
    R, H = w.shape[0], X.shape[1]
    for g in prange((R + 3) // 4):
        n = min(4, R - 4 * g)
        rows = np.empty((4, H), dtype=np.float32)
        for k in range(n):
            dequant_row_mxfp4(w[4 * g + k], rows[k], H // MXFP4_BLOCK_SIZE)
        _rows_times_tokens(rows, n, X, out, 4 * g)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matmul_q8_0(w, X, out):
    R, H = w.shape[0], X.shape[1]
    for g in prange((R + 3) // 4):
        n = min(4, R - 4 * g)
        rows = np.empty((4, H), dtype=np.float32)
        for k in range(n):
            dequant_row_q8_0(w[4 * g + k], rows[k], H // Q8_0_BLOCK_SIZE)
        _rows_times_tokens(rows, n, X, out, 4 * g)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matmul_16bit(w, bf16, X, out):
    """For BF16 (`bf16`) or F16 bit patterns w."""
    R, H = w.shape[0], X.shape[1]
    for g in prange((R + 3) // 4):
        n = min(4, R - 4 * g)
        rows = np.empty((4, H), dtype=np.float32)
        for k in range(n):
            if bf16:
                dequant_row_bf16(w[4 * g + k], rows[k])
            else:
                dequant_row_f16(w[4 * g + k], rows[k])
        _rows_times_tokens(rows, n, X, out, 4 * g)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _matmul_f32(w, X, out):
    R, H = w.shape[0], X.shape[1]
    for g in prange((R + 3) // 4):
        n = min(4, R - 4 * g)
        rows = np.empty((4, H), dtype=np.float32)
        rows[:n] = w[4 * g:4 * g + n]
        _rows_times_tokens(rows, n, X, out, 4 * g)


def _matmul_rows(w, data: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """out [T, rows] = X @ rows(data).T, tile by tile of tokens."""
    for t0 in range(0, X.shape[0], _TOKEN_TILE):
        Xt, Ot = X[t0:t0 + _TOKEN_TILE], out[t0:t0 + _TOKEN_TILE]
        if w.type == GGMLType.MXFP4:
            _matmul_mxfp4(data, Xt, Ot)
        elif w.type == GGMLType.Q8_0:
            _matmul_q8_0(data, Xt, Ot)
        elif w.type in (GGMLType.BF16, GGMLType.F16):
            _matmul_16bit(data.view(np.uint16), w.type == GGMLType.BF16, Xt, Ot)
        else:
            _matmul_f32(data, Xt, Ot)


def matmul(w, X: np.ndarray, *, int8_activations: bool = False) -> np.ndarray:
    """`X @ W.T` for X float32 [T, in] → float32 [T, out]. With `int8_activations`, where the CPU and the weight
    type allow (`int8.supports`), X is quantized to 8 bits a value, 32 values a scale, and the products are integer
    (`int8`); else float32 throughout."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{w.name}: matmul needs a matrix of activations, got shape {X.shape}")
    _check_matrix(w, X.shape[1])
    if int8_activations and int8.supports(w.type):
        return int8.matmul(w.data, int8.Panel(X, w.type))
    out = np.empty((X.shape[0], w.shape[0]), dtype=np.float32)
    _matmul_rows(w, w.data, X, out)
    return out


def linear(w, X: np.ndarray, bias: np.ndarray | None = None, *, int8_activations: bool = False) -> np.ndarray:
    """`X @ W.T (+ bias)` for X [T, in]: the decode kernels for up to FEW_TOKENS rows, the prefill kernels for more
    (`matmul`)."""
    if X.ndim == 2 and X.shape[0] <= FEW_TOKENS:
        return _few_tokens(w, X, bias, int8_activations)
    out = matmul(w, X, int8_activations=int8_activations)
    if bias is not None:
        out += _bias(w, bias)
    return out


def linear_many(ws, X: np.ndarray, biases=None, *, int8_activations: bool = False) -> list[np.ndarray]:
    """[`linear`(w, X, b) for w, b in zip(ws, biases)] (`biases` None: none). For a few tokens and matrices of one
    type with a fused kernel (Q8_0, BF16: the attention projections' types), one parallel pass over the rows of them
    all, the same numbers with one start of the threads instead of one a matrix."""
    biases = [None] * len(ws) if biases is None else biases
    if not (X.ndim == 2 and X.shape[0] <= FEW_TOKENS and len({w.type for w in ws}) == 1 and ws[0].type in _MATVECS):
        return [linear(w, X, b, int8_activations=int8_activations) for w, b in zip(ws, biases)]
    X = np.ascontiguousarray(X, dtype=np.float32)
    for w in ws:
        _check_matrix(w, X.shape[1])
    first_row = _first_rows(tuple(w.shape[0] for w in ws))
    out = np.empty((X.shape[0], int(first_row[-1])), dtype=np.float32)
    data, biases = tuple(w.data for w in ws), tuple(_bias(w, b) for w, b in zip(ws, biases))
    if _int8_q8_0(ws[0].type, int8_activations):
        _matvecs_q8_0_int8(data, first_row, X, int8.decode_lanes(), biases, out)
    else:
        _MATVECS[ws[0].type](data, first_row, X, biases, out)
    return [out[:, a:b] for a, b in zip(first_row[:-1].tolist(), first_row[1:].tolist())]


@functools.cache
def _first_rows(rows: tuple[int, ...]) -> np.ndarray:
    """Where each of several stacked matrices starts, and the end: int64 [len(rows) + 1] (shared: read-only)."""
    a = np.cumsum((0,) + rows, dtype=np.int64)
    a.flags.writeable = False
    return a


# --- mixture of experts ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH, inline="always")
def _swiglu(g, u, alpha, limit):
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return g / (np.float32(1.0) + np.exp(-alpha * g)) * (u + np.float32(1.0))


@njit(cache=True)
def _unpack_assignments(ids, wts, assignments, n_expert):
    """The token and weight of each listed assignment (a = t * k + j: token t's j-th expert) of ids and weights
    [T, k], and the assignments grouped by expert: group s is order[first[s]:first[s + 1]], all of expert
    experts[s]. None if an expert id lies outside [0, n_expert): checked before any kernel reads a weight."""
    k = ids.shape[1]
    n = assignments.shape[0]
    tok = np.empty(n, dtype=np.int64)
    exp = np.empty(n, dtype=np.int64)
    wt = np.empty(n, dtype=np.float32)
    for i in range(n):
        t, j = divmod(assignments[i], k)
        tok[i], exp[i], wt[i] = t, ids[t, j], wts[t, j]
        if not 0 <= exp[i] < n_expert:
            return None
    order = np.argsort(exp, kind="mergesort")
    first = np.empty(n + 1, dtype=np.int64)
    experts = np.empty(n, dtype=np.int64)
    n_groups = 0
    for i in range(n):
        if i == 0 or exp[order[i]] != exp[order[i - 1]]:
            first[n_groups] = i
            experts[n_groups] = exp[order[i]]
            n_groups += 1
    first[n_groups] = n
    return tok, wt, order, first[:n_groups + 1], experts[:n_groups]


@njit(cache=True)
def _quantized_rows(X, rows, lanes):
    """X's rows listed in `rows` quantized for `int8.row_dot_mxfp4` with `lanes` (others left unset), each once;
    with lanes 0 (float32 activations), empty arrays."""
    n_blocks = X.shape[1] // MXFP4_BLOCK_SIZE
    slots = int8.vector_slots(n_blocks, lanes, int8.MXFP4_BLOCK_LANES) if lanes else 0
    xq = np.empty((X.shape[0], X.shape[1] if lanes else 0), dtype=np.int8)
    xs = np.empty((X.shape[0], slots), dtype=np.float32)
    xc = np.empty((X.shape[0], slots), dtype=np.int32)
    if lanes:
        done = np.zeros(X.shape[0], dtype=np.bool_)
        for t in rows:
            if not done[t]:
                int8.quantize_vector(X[t], lanes, int8.MXFP4_OFFSET, int8.MXFP4_BLOCK_LANES, xq[t], xs[t], xc[t])
                done[t] = True
    return xq, xs, xc


# A compile-time constant: without VNNI the 8-bit row dot is never compiled (its instructions may not exist).
_VNNI = int8.DOT4 is not None


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _expert_row_dot(row, X, xq, xs, xc, t, lanes):
    """Row · X[t]: float32, or with lanes > 0 the 8-bit row dot on X[t] as `_quantized_rows` left it."""
    if _VNNI:
        if lanes:
            return int8.row_dot_mxfp4(row, xq[t], xs[t], xc[t], X.shape[1] // MXFP4_BLOCK_SIZE, lanes)
    return row_dot_mxfp4(row, X[t], X.shape[1] // MXFP4_BLOCK_SIZE)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _moe_assignments(X, ids, wts, assignments, gate, up, down, gate_b, up_b, down_b, alpha, limit, lanes, out):
    """out[t] += w * expert e applied to X[t] for each listed assignment (`_unpack_assignments`), over the packed
    MXFP4 rows, with float32 activations (lanes 0) or 8-bit ones (`int8.row_dot_mxfp4` with `lanes`: the token
    rows and the SwiGLU outputs quantized once each, serially: a few vectors, where starting the threads would
    cost more). False (nothing done) if an expert id is out of range. `out` rows must start at zero.
    An expert's row is read once for all the assignments it has (a few tokens: drafted ones being checked), and
    each thread takes a contiguous range of each expert's rows (interleaving the experts' rows cost a tenth of the
    down pass's rate). Each token's sum is taken in its own order of experts, so its numbers do not depend on the
    other tokens."""
    unpacked = _unpack_assignments(ids, wts, assignments, gate.shape[0])
    if unpacked is None:
        return False
    tok, wt, order, first, experts = unpacked
    n_assign, n_groups = tok.shape[0], experts.shape[0]
    n_ff, n_embd = gate.shape[1], X.shape[1]
    xq, xs, xc = _quantized_rows(X, tok, lanes)
    act = np.empty((n_assign, n_ff), dtype=np.float32)
    for sr in prange(n_groups * n_ff):
        s = sr // n_ff
        r = sr - s * n_ff
        e = experts[s]
        for i in range(first[s], first[s + 1]):
            a = order[i]
            g = _expert_row_dot(gate[e, r], X, xq, xs, xc, tok[a], lanes) + gate_b[e, r]
            u = _expert_row_dot(up[e, r], X, xq, xs, xc, tok[a], lanes) + up_b[e, r]
            act[a, r] = _swiglu(g, u, alpha, limit)
    act_q, act_s, act_c = _quantized_rows(act, np.arange(n_assign), lanes)
    Y = np.empty((n_assign, n_embd), dtype=np.float32)
    for sr in prange(n_groups * n_embd):
        s = sr // n_embd
        r = sr - s * n_embd
        e = experts[s]
        for i in range(first[s], first[s + 1]):
            a = order[i]
            Y[a, r] = _expert_row_dot(down[e, r], act, act_q, act_s, act_c, a, lanes) + down_b[e, r]
    # Parallel over output rows, so every output element has one writer.
    for r in prange(n_embd):
        for a in range(n_assign):
            out[tok[a], r] += wt[a] * Y[a, r]
    return True


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _moe_row_lanes_int8(X, tok, wt, seg_expert, seg_first, seg_count, gate, up, down, gate_b, up_b, down_b, alpha,
                        limit, lanes, threads, out):
    """out[tok[a]] += wt[a] · expert seg_expert[s] applied to X[tok[a]] for the assignments a of each segment s
    (seg_first[s] to seg_first[s] + seg_count[s] - 1), with 8-bit activations: `lanes` rows of an expert at a time
    against all of its tokens (`int8.row_lanes_mxfp4`). Each of `threads` threads takes one range of row tiles in
    every expert, so the threads share each expert's work evenly, and one writer has each output element."""
    n_assign = tok.shape[0]
    n_ff, n_embd = gate.shape[1], X.shape[1]
    blocks_in, blocks_ff = n_embd // MXFP4_BLOCK_SIZE, n_ff // MXFP4_BLOCK_SIZE
    used = np.zeros(X.shape[0], dtype=np.bool_)
    for a in range(n_assign):
        used[tok[a]] = True
    xq = np.empty((X.shape[0], n_embd), dtype=np.int8)
    xs = np.empty((X.shape[0], blocks_in), dtype=np.float32)
    xc = np.empty((X.shape[0], blocks_in), dtype=np.int32)
    for t in prange(X.shape[0]):
        if used[t]:
            int8.quantize_row(X[t], int8.MXFP4_OFFSET, xq[t], xs[t], xc[t])
    tiles_ff, tiles_embd = -(-n_ff // lanes), -(-n_embd // lanes)
    G, U = np.empty((n_assign, tiles_ff * lanes), dtype=np.float32), np.empty((n_assign, tiles_ff * lanes),
                                                                              dtype=np.float32)
    for thread in prange(threads):
        for s in range(seg_expert.shape[0]):
            e, first, count = seg_expert[s], seg_first[s], seg_count[s]
            for tile in range(thread * tiles_ff // threads, (thread + 1) * tiles_ff // threads):
                int8.row_lanes_mxfp4(gate[e], tile * lanes, xq, xs, xc, tok, first, count, lanes, G)
                int8.row_lanes_mxfp4(up[e], tile * lanes, xq, xs, xc, tok, first, count, lanes, U)
    act = np.empty((n_assign, n_ff), dtype=np.float32)
    act_q = np.empty((n_assign, n_ff), dtype=np.int8)
    act_s = np.empty((n_assign, blocks_ff), dtype=np.float32)
    act_c = np.empty((n_assign, blocks_ff), dtype=np.int32)
    for s in prange(seg_expert.shape[0]):
        e = seg_expert[s]
        for a in range(seg_first[s], seg_first[s] + seg_count[s]):
            for r in range(n_ff):
                act[a, r] = _swiglu(G[a, r] + gate_b[e, r], U[a, r] + up_b[e, r], alpha, limit)
            int8.quantize_row(act[a], int8.MXFP4_OFFSET, act_q[a], act_s[a], act_c[a])
    assignments = np.arange(n_assign)
    Y = np.empty((n_assign, tiles_embd * lanes), dtype=np.float32)
    for thread in prange(threads):  # each output element has one writer
        first_tile, end_tile = thread * tiles_embd // threads, (thread + 1) * tiles_embd // threads
        for s in range(seg_expert.shape[0]):
            e, first, count = seg_expert[s], seg_first[s], seg_count[s]
            for tile in range(first_tile, end_tile):
                int8.row_lanes_mxfp4(down[e], tile * lanes, act_q, act_s, act_c, assignments, first, count, lanes, Y)
            for a in range(first, first + count):
                for r in range(first_tile * lanes, min(end_tile * lanes, n_embd)):
                    out[tok[a], r] += wt[a] * (Y[a, r] + down_b[e, r])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _swiglu_rows(G, U, alpha, limit, out):
    for t in prange(G.shape[0]):
        for i in range(G.shape[1]):
            out[t, i] = _swiglu(G[t, i], U[t, i], alpha, limit)


def moe(gate_exps, up_exps, down_exps, gate_b: np.ndarray, up_b: np.ndarray, down_b: np.ndarray, X: np.ndarray,
        expert_ids: np.ndarray, expert_weights: np.ndarray, *, alpha: float, limit: float,
        dense_min_tokens: int = 2, int8_activations: bool = False) -> np.ndarray:
    """Σ over each token's selected experts of weight · (down · swiglu(gate·x + b_g, up·x + b_u) + b_d), the
    SwiGLU clamped at `limit` with slope `alpha` (the model's `swiglu_limit`, `swiglu_alpha`; spec §2.6).

    X float32 [T, H]; expert_ids int [T, k]; expert_weights float32 [T, k]; MXFP4 gate/up (E, I, H), down (E, H, I).
    Up to FEW_TOKENS tokens (decode) go through the fused decode kernel. Of more, an expert chosen by at least
    `dense_min_tokens` tokens goes through the prefill kernels (each row decoded once for all its tokens); the rest
    through the fused decode kernel. With `int8_activations`, where the CPU has VNNI (`int8.supports`), both take
    8-bit activations, the prefill's experts a tile of rows at a time against all of their tokens
    (`int8.row_lanes_mxfp4`); else float32.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    T, H = X.shape
    E, I = gate_exps.shape[0], gate_exps.shape[1]
    for w, shape in ((gate_exps, (E, I, H)), (up_exps, (E, I, H)), (down_exps, (E, H, I))):
        if w.type != GGMLType.MXFP4 or tuple(w.shape) != shape:
            raise ValueError(f"{w.name}: expected MXFP4 experts of shape {shape}, got {w.type.name} {w.shape}")
    if H % MXFP4_BLOCK_SIZE or I % MXFP4_BLOCK_SIZE:
        raise ValueError(f"expert sizes {H}, {I} are not whole blocks of {MXFP4_BLOCK_SIZE}")
    for b, shape, name in ((gate_b, (E, I), "gate bias"), (up_b, (E, I), "up bias"), (down_b, (E, H), "down bias")):
        if b.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {b.shape}")
    # Decode passes the router's own arrays, already of these types: no conversion (each NumPy call counts here).
    expert_ids, expert_weights, gate_b, up_b, down_b = (
        a if a.dtype == dtype and a.flags.c_contiguous else np.ascontiguousarray(a, dtype=dtype)
        for a, dtype in ((np.asarray(expert_ids), np.int64), (np.asarray(expert_weights), np.float32),
                         (gate_b, np.float32), (up_b, np.float32), (down_b, np.float32)))
    if expert_ids.ndim != 2 or expert_ids.shape[0] != T or expert_weights.shape != expert_ids.shape:
        raise ValueError(f"expert ids {expert_ids.shape} / weights {expert_weights.shape} do not match {T} tokens")
    alpha, limit = np.float32(alpha), np.float32(limit)

    out = np.zeros((T, H), dtype=np.float32)
    k = expert_ids.shape[1]
    if T <= FEW_TOKENS:  # decode, or drafted tokens checked: the fused kernel (which checks the ids)
        sparse, dense = _every_assignment(T * k), ()
    else:
        exp = expert_ids.reshape(-1)
        if exp.size and (exp.min() < 0 or exp.max() >= E):
            raise ValueError(f"expert ids must lie in [0, {E})")
        counts = np.bincount(exp, minlength=E)
        is_dense = counts[exp] >= dense_min_tokens
        sparse, dense = np.flatnonzero(~is_dense), np.flatnonzero(counts >= dense_min_tokens)
    int8_experts = int8_activations and int8.supports(GGMLType.MXFP4)
    if len(sparse):
        done = _moe_assignments(X, expert_ids, expert_weights, sparse, gate_exps.data, up_exps.data, down_exps.data,
                                gate_b, up_b, down_b, alpha, limit, int8.decode_lanes() if int8_experts else 0, out)
        if not done:
            raise ValueError(f"expert ids must lie in [0, {E})")
    if not len(dense):
        return out
    tok = np.repeat(np.arange(T, dtype=np.int64), k)
    wt = expert_weights.reshape(-1)
    if int8_experts:
        # The dense experts' assignments in expert order: a segment of consecutive assignments an expert.
        order = np.flatnonzero(is_dense)[np.argsort(exp[is_dense], kind="stable")]
        experts, first, n = np.unique(exp[order], return_index=True, return_counts=True)
        _moe_row_lanes_int8(X, tok[order], wt[order], experts, first, n, gate_exps.data, up_exps.data,
                            down_exps.data, gate_b, up_b, down_b, alpha, limit, int8.decode_lanes(),
                            numba.get_num_threads(), out)
        return out
    for e in dense:
        sel = np.flatnonzero(exp == e)
        rows = tok[sel]
        g, u = (_expert_matmul(w, e, X[rows]) for w in (gate_exps, up_exps))
        act = np.empty_like(g)
        _swiglu_rows(g + gate_b[e], u + up_b[e], alpha, limit, act)
        y = _expert_matmul(down_exps, e, act)
        out[rows] += wt[sel, None] * (y + down_b[e])  # rows are distinct: a token picks an expert at most once
    return out


@functools.cache
def _every_assignment(n: int) -> np.ndarray:
    """0 .. n - 1: every assignment of a few tokens (shared: read-only)."""
    a = np.arange(n, dtype=np.int64)
    a.flags.writeable = False
    return a


def _expert_matmul(w, e: int, X: np.ndarray) -> np.ndarray:
    """X @ W[e].T in float32."""
    out = np.empty((X.shape[0], w.shape[1]), dtype=np.float32)
    _matmul_rows(w, w.data[e], X, out)
    return out


