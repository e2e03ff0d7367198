"""numba.cuda kernels of the CUDA backend, and their launch wrappers.

The kernels do what CuPy and cuBLAS cannot: products with the file's packed weights (MXFP4, Q8_0, BF16 bits) for
decode, their dequantization for prefill (the backend then multiplies with `xp.matmul`, cuBLAS on a GPU), the fused
MoE of one token, the KV cache's stores and attention with sinks over it, and the small ops whose launches add up in
decode (RMSNorm, RoPE, router). What each computes is exactly the CPU path's (engine/kernels.py, attention.py,
kv_cache.py, model.py); the tests compare them with float64 NumPy under numba's CUDA simulator.

How they run on a GPU. Work is split into items (a weight row, a (query, head) pair, a token); a `group` of lanes
(`device.Launch`) works on one item, each lane taking every group-th piece of it, and the group adds its partial
sums with warp shuffles (`_group_sum`). On a GPU the group is a warp, so a row's bytes are read by 32 neighbouring
lanes at once (coalesced) and one block of 4 warps holds 4 rows; every kernel strides over its items, so the grid
only needs to fill the device. The loops that contain shuffles are uniform over the block (invalid items compute
zeros and skip their stores), which a full-mask shuffle needs and the simulator's emulation of it relies on.

GPU launch shapes (device.launch): matvec, MoE, RMSNorm and attention a warp per item in blocks of 4 warps (the
structure of llama.cpp's mul_mat_vec kernels); dequantization, SwiGLU, RoPE, KV stores a thread per value (or per
q8_0 block / per (token, frequency)), so stores are coalesced; the router a thread per token. Not done yet, and the
next steps if the measured GPU numbers ask for them: activations quantized to int8 for dp4a dot products (llama.cpp's
mmvq; here x stays float32, so results match the CPU path), split-K attention for long decode contexts
(flash-decoding), shared-memory K/V tiles for prefill attention (now each warp reads its rows, the warps of one KV
group hitting L1 together).

Every wrapper checks shapes and types in Python, so no kernel reads out of bounds; indices read from device memory
(tokens, expert ids, the start position of a CUDA-graph step) cannot be checked without a sync, so kernels bound
them and write NaN for an invalid one, which the engine's finite-logits check reports.

`w` arguments are tensors with `.name`, `.type` (GGMLQuantizationType), NumPy-order `.shape` and `.data`, a device
array of the stored layout: MXFP4 and Q8_0 uint8 [..., row_bytes], BF16 uint16 bits, F16 float16 (or its uint16
bits), F32 float32.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGMLType
from numba import cuda, float32, float64, int32

from ...format import mxfp4
from . import device
from .device import Launch, bits_to_float, shfl_xor

MXFP4_BLOCK_SIZE, MXFP4_BLOCK_BYTES = mxfp4.BLOCK_VALUES, mxfp4.BLOCK_BYTES  # 32 values: e8m0 scale + 16 bytes
Q8_0_BLOCK_SIZE, Q8_0_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLType.Q8_0]  # 32 values: f16 scale + 32 int8
Q8_0_HALVES = Q8_0_BLOCK_BYTES // 2  # a Q8_0 block in 16-bit words: its scale is the first
MXFP4_LANE_BYTES = 4  # code bytes a lane takes from an MXFP4 block (8 values): 4 lanes cover its 16 bytes
Q8_0_LANE_VALUES = 8  # int8 values a lane takes from a Q8_0 block: 4 lanes cover its 32
MAX_ACC = 64  # head dimensions one lane of attention accumulates (head_dim <= MAX_ACC * group)
DENSE_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
WEIGHT_TYPES = DENSE_TYPES + (GGMLType.Q8_0, GGMLType.MXFP4)
NAN = float32(np.nan)


# --- device helpers -------------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _lanes(group):
    """(lane within its group, the group's index in the block, groups per block)."""
    return cuda.threadIdx.x % group, cuda.threadIdx.x // group, cuda.blockDim.x // group


@cuda.jit(device=True)
def _group_sum(value, group):
    """The sum of `value` over the aligned `group` lanes, in every lane (butterfly of xor shuffles)."""
    mask = group >> 1
    while mask > 0:
        value += shfl_xor(value, mask)
        mask >>= 1
    return value


@cuda.jit(device=True)
def _e8m0_half(e):
    """2^(e - 128) from an E8M0 byte, as ggml's GGML_E8M0_TO_FP32_HALF (float32 denormals for e < 2)."""
    e = int32(e)
    return bits_to_float((e - 1) << 23 if e >= 2 else int32(0x00200000) << e)


@cuda.jit(device=True)
def _int8(byte):
    """A uint8 read as the int8 it stores."""
    return (int32(byte) ^ 128) - 128


@cuda.jit(device=True)
def _bf16(bits):
    return bits_to_float(int32(bits) << 16)


@cuda.jit(device=True)
def _swiglu(g, u, alpha, limit):
    """Clamped SwiGLU (spec §2.6), as engine/kernels.py: gate clamped above, up both sides, +1 on up."""
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return g / (float32(1.0) + math.exp(-alpha * g)) * (u + float32(1.0))


# One weight value, element i of row r, per stored type. `halves` is Q8_0's data seen as float16 (the scales),
# `table` the E2M1 values (MXFP4, `_e2m1_table`); the other types ignore them.
@cuda.jit(device=True)
def _value_mxfp4(w, halves, table, r, i):
    block = (i // MXFP4_BLOCK_SIZE) * MXFP4_BLOCK_BYTES
    j = i % MXFP4_BLOCK_SIZE
    byte = int32(w[r, block + 1 + j % 16])
    code = byte & 15 if j < 16 else byte >> 4
    return table[code] * _e8m0_half(w[r, block])


@cuda.jit(device=True)
def _value_q8_0(w, halves, table, r, i):
    b = i // Q8_0_BLOCK_SIZE
    return float32(_int8(w[r, b * Q8_0_BLOCK_BYTES + 2 + i % Q8_0_BLOCK_SIZE])) * float32(halves[r, b * Q8_0_HALVES])


@cuda.jit(device=True)
def _value_bf16(w, halves, table, r, i):
    return _bf16(w[r, i])


@cuda.jit(device=True)
def _value_float(w, halves, table, r, i):
    return float32(w[r, i])


# A lane's share of a row's dot product with x, per stored type.
@cuda.jit(device=True)
def _dot_mxfp4(w, halves, table, r, x, lane, group):
    """Lanes take 4-byte quarters of the blocks in turn: a warp reads 8 whole blocks (136 contiguous bytes) a step,
    and each lane's 8 values of x are two runs of 4."""
    acc = float32(0.0)
    for quarter in range(lane, (x.shape[0] // MXFP4_BLOCK_SIZE) * 4, group):
        b = quarter // 4
        j0 = (quarter % 4) * MXFP4_LANE_BYTES
        base = b * MXFP4_BLOCK_BYTES
        xb = b * MXFP4_BLOCK_SIZE
        s = float32(0.0)
        for j in range(j0, j0 + MXFP4_LANE_BYTES):
            byte = int32(w[r, base + 1 + j])
            s += table[byte & 15] * x[xb + j] + table[byte >> 4] * x[xb + 16 + j]
        acc += s * _e8m0_half(w[r, base])
    return acc


@cuda.jit(device=True)
def _dot_q8_0(w, halves, table, r, x, lane, group):
    """Lanes take quarters (8 values) of the blocks in turn: a warp reads 8 whole blocks (272 bytes) a step."""
    acc = float32(0.0)
    for quarter in range(lane, (x.shape[0] // Q8_0_BLOCK_SIZE) * 4, group):
        b = quarter // 4
        j0 = (quarter % 4) * Q8_0_LANE_VALUES
        base = b * Q8_0_BLOCK_BYTES + 2
        xb = b * Q8_0_BLOCK_SIZE
        s = float32(0.0)
        for j in range(j0, j0 + Q8_0_LANE_VALUES):
            s += float32(_int8(w[r, base + j])) * x[xb + j]
        acc += s * float32(halves[r, b * Q8_0_HALVES])
    return acc


@cuda.jit(device=True)
def _dot_bf16(w, halves, table, r, x, lane, group):
    acc = float32(0.0)
    for i in range(lane, x.shape[0], group):  # neighbouring lanes, neighbouring values: coalesced
        acc += _bf16(w[r, i]) * x[i]
    return acc


@cuda.jit(device=True)
def _dot_float(w, halves, table, r, x, lane, group):
    acc = float32(0.0)
    for i in range(lane, x.shape[0], group):
        acc += float32(w[r, i]) * x[i]
    return acc


@cuda.jit(device=True)
def _cache_value(cache, scales, g, slot, i):
    """Value i of a KV cache row: float32 or float16 as stored, q8_0 int8 times its block's scale (scales has a
    last axis of length 0 for the unquantized types)."""
    v = float32(cache[g, slot, i])
    if scales.shape[2] > 0:
        v *= scales[g, slot, i // Q8_0_BLOCK_SIZE]
    return v


# --- weights: dequantization, matrix-vector products ----------------------------------------------------------------
def _make_dequantize(value):
    @cuda.jit
    def dequantize_rows(w, halves, table, rows, row_offset, out):
        """out[o] = row rows[o] of w (row_offset + o if rows is empty), one value per thread so the stores are
        coalesced; NaN for a row index outside w."""
        n = out.shape[1]
        n_rows = w.shape[0]
        for idx in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
            o = idx // n
            i = idx - o * n
            r = rows[o] if rows.shape[0] > 0 else row_offset + o
            out[o, i] = value(w, halves, table, r, i) if 0 <= r < n_rows else NAN

    return dequantize_rows


def _make_matvec(dot):
    @cuda.jit
    def matvec(w, halves, table, x, bias, accumulate, out, group):
        """out[r] = (out[r] if accumulate) + w[r]·x (+ bias[r] if bias is not empty): a group of lanes per row."""
        lane, slot, per_block = _lanes(group)
        n_rows = out.shape[0]
        for base in range(cuda.blockIdx.x * per_block, n_rows, cuda.gridDim.x * per_block):
            r = base + slot
            partial = float32(0.0)
            if r < n_rows:
                partial = dot(w, halves, table, r, x, lane, group)
            total = _group_sum(partial, group)
            if r < n_rows and lane == 0:
                if bias.shape[0] > 0:
                    total += bias[r]
                if accumulate:
                    total += out[r]
                out[r] = total

    return matvec


_VALUE = {GGMLType.MXFP4: _value_mxfp4, GGMLType.Q8_0: _value_q8_0, GGMLType.BF16: _value_bf16,
          GGMLType.F16: _value_float, GGMLType.F32: _value_float}
_DOT = {GGMLType.MXFP4: _dot_mxfp4, GGMLType.Q8_0: _dot_q8_0, GGMLType.BF16: _dot_bf16,
        GGMLType.F16: _dot_float, GGMLType.F32: _dot_float}
_DEQUANTIZE = {t: _make_dequantize(f) for t, f in _VALUE.items()}
_MATVEC = {t: _make_matvec(f) for t, f in _DOT.items()}


def _rows_2d(w):
    """w's data as rows of its last axis [prod(shape[:-1]), stored row] and the view Q8_0's kernels read its scales
    through (float16 words; the data itself for the other types)."""
    if w.type not in WEIGHT_TYPES:
        raise ValueError(f"{w.name}: unsupported tensor type {w.type.name}")
    block_values, block_bytes = GGML_QUANT_SIZES[w.type]
    n = w.shape[-1]
    if n % block_values:
        raise ValueError(f"{w.name}: rows of {n} values are not whole blocks of {block_values}")
    row_stored = n // block_values * block_bytes if w.type in (GGMLType.MXFP4, GGMLType.Q8_0) else n
    dtype = {GGMLType.MXFP4: np.uint8, GGMLType.Q8_0: np.uint8, GGMLType.BF16: np.uint16,
             GGMLType.F16: np.float16, GGMLType.F32: np.float32}[w.type]
    data = w.data.view(np.float16) if w.type == GGMLType.F16 and w.data.dtype == np.uint16 else w.data
    n_rows = math.prod(w.shape[:-1])
    if data.dtype != dtype or data.shape[:-1] != tuple(w.shape[:-1]) or data.shape[-1] != row_stored:
        raise ValueError(f"{w.name}: {w.type.name} data of shape {w.shape} must be {np.dtype(dtype).name} "
                         f"{tuple(w.shape[:-1]) + (row_stored,)}, got {data.dtype.name} {data.shape}")
    if not data.flags.c_contiguous:
        raise ValueError(f"{w.name}: data must be C-contiguous")
    data = data.reshape(n_rows, row_stored)
    return data, (data.view(np.float16) if w.type == GGMLType.Q8_0 else data)


def _check_vector(name: str, a, n: int, dtype=np.float32) -> None:
    if not device.is_device_array(a) or a.dtype != dtype or a.shape != (n,):
        raise ValueError(f"{name}: expected a device {np.dtype(dtype).name} array of shape ({n},), got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")


def _check_out(out, shape, dtypes=(np.float32,)):
    if out is None:
        return device.empty(shape, dtypes[0])
    if not device.is_device_array(out) or out.dtype not in dtypes or out.shape != tuple(shape) \
            or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous device array of shape {tuple(shape)} and type "
                         f"{'/'.join(np.dtype(d).name for d in dtypes)}, got {getattr(out, 'dtype', None)} "
                         f"{getattr(out, 'shape', None)}")
    return out


def _index_array(name: str, a, bound: int):
    """Indices below `bound` as a device int32/int64 array: a host NumPy array (under the simulator, any) is
    checked and uploaded; a device array is taken as it is (the kernel bounds each index)."""
    if isinstance(a, np.ndarray):
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected a 1-D integer array, got {a.dtype} {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= bound):
            raise ValueError(f"{name}: indices must lie in [0, {bound})")
        return device.to_device(a, np.int64)
    if not device.is_device_array(a) or a.ndim != 1 or a.dtype not in (np.int32, np.int64):
        raise ValueError(f"{name}: expected a device int32/int64 array, got {getattr(a, 'dtype', type(a))}")
    return a


@cache
def _e2m1_table():
    """MXFP4's E2M1 values, doubled to pair with the halved scale 2^(e-128) (ggml's kvalues, spec §3.3), as a device
    array: a warp's lookups fall in one 64-byte line, one L1 transaction (a constant-memory table would serialize
    lanes that read different entries)."""
    return device.to_device(mxfp4.KVALUES, np.float32)


@cache
def _empty(dtype=np.float32, shape=(0,)):
    """An empty device array: the 'none' of an optional array argument (bias, rows, scales)."""
    return device.zeros(shape, dtype)


def dequantize(w, *, rows=None, first_row: int = 0, n_rows: int | None = None, dtype=np.float32, out=None,
               launch: Launch | None = None):
    """Rows of w's last axis as float32 or float16 [n, w.shape[-1]]: the rows listed in `rows` (token ids for the
    embedding; a host array is bounds-checked, a device array's out-of-range ids give NaN rows), or `n_rows` rows
    from `first_row` (one expert of a 3-D tensor: first_row = e * shape[1]; default all rows)."""
    data, halves = _rows_2d(w)
    if rows is not None:
        rows = _index_array("rows", rows, data.shape[0])
        n_out = rows.shape[0]
    else:
        n_out = data.shape[0] - first_row if n_rows is None else n_rows
        if first_row < 0 or n_out < 0 or first_row + n_out > data.shape[0]:
            raise ValueError(f"{w.name}: rows {first_row}..{first_row + n_out - 1} are outside its "
                             f"{data.shape[0]} rows")
        rows = _empty(np.int64)
    out = _check_out(out, (n_out, w.shape[-1]), (np.dtype(dtype),))
    cfg = launch or device.launch(out.size)
    _DEQUANTIZE[w.type][cfg.blocks, cfg.threads, device.stream()](data, halves, _e2m1_table(), rows, first_row, out)
    return out


def embed(w, tokens, *, out=None, launch: Launch | None = None):
    """Embedding rows of `tokens` as float32 [T, H]."""
    return dequantize(w, rows=tokens, out=out, launch=launch)


def matvec(w, x, *, bias=None, out=None, accumulate: bool = False, launch: Launch | None = None):
    """w @ x (+ bias) for a 2-D weight of any stored type and float32 x [in] → float32 [out]; `accumulate` adds the
    result to `out` (a residual). Decode's linear layers: a warp per row on a GPU."""
    if len(w.shape) != 2:
        raise ValueError(f"{w.name}: expected a matrix, got shape {w.shape}")
    data, halves = _rows_2d(w)
    n_out, n_in = w.shape
    _check_vector(f"{w.name} input", x, n_in)
    if bias is None:
        bias = _empty()
    else:
        _check_vector(f"{w.name} bias", bias, n_out)
    if accumulate and out is None:
        raise ValueError("accumulate needs out")
    out = _check_out(out, (n_out,))
    cfg = launch or device.launch(n_out, device.WARP)
    _MATVEC[w.type][cfg.blocks, cfg.threads, device.stream()](data, halves, _e2m1_table(), x, bias, accumulate, out, cfg.group)
    return out


# --- mixture of experts, one token ----------------------------------------------------------------------------------
@cuda.jit
def _moe_gate_up(gate, up, table, gate_b, up_b, x, ids, alpha, limit, act, group):
    """act[a, r] = swiglu(gate[e]·x + gate_b[e], up[e]·x + up_b[e]) at row r, e = ids[a]: a group per (a, r)."""
    lane, slot, per_block = _lanes(group)
    k, n_ff = act.shape
    n_expert = gate.shape[0]
    for base in range(cuda.blockIdx.x * per_block, k * n_ff, cuda.gridDim.x * per_block):
        item = base + slot
        a = item // n_ff
        r = item - a * n_ff
        e = ids[a] if item < k * n_ff else -1
        g = u = float32(0.0)
        if 0 <= e < n_expert:
            g = _dot_mxfp4(gate[e], gate, table, r, x, lane, group)
            u = _dot_mxfp4(up[e], up, table, r, x, lane, group)
        g = _group_sum(g, group)
        u = _group_sum(u, group)
        if item < k * n_ff and lane == 0:
            act[a, r] = _swiglu(g + gate_b[e, r], u + up_b[e, r], alpha, limit) if 0 <= e < n_expert else NAN


@cuda.jit
def _moe_down(down, table, down_b, act, ids, weights, accumulate, out, group):
    """out[r] = (out[r] if accumulate) + Σ_a weights[a] · (down[ids[a]][r]·act[a] + down_b[ids[a], r]): the k
    experts' rows of one output summed in registers, one reduction per row."""
    lane, slot, per_block = _lanes(group)
    n_embd = out.shape[0]
    k = act.shape[0]
    n_expert = down.shape[0]
    for base in range(cuda.blockIdx.x * per_block, n_embd, cuda.gridDim.x * per_block):
        r = base + slot
        partial = float32(0.0)
        bias = float32(0.0)
        if r < n_embd:
            for a in range(k):
                e = ids[a]
                if 0 <= e < n_expert:
                    partial += weights[a] * _dot_mxfp4(down[e], down, table, r, act[a], lane, group)
                    bias += weights[a] * down_b[e, r]
                else:
                    bias = NAN
        total = _group_sum(partial, group) + bias
        if r < n_embd and lane == 0:
            out[r] = out[r] + total if accumulate else total


def _check_experts(gate, up, down, gate_b, up_b, down_b):
    E, I, H = gate.shape
    for w, shape in ((gate, (E, I, H)), (up, (E, I, H)), (down, (E, H, I))):
        if w.type != GGMLType.MXFP4 or tuple(w.shape) != shape:
            raise ValueError(f"{w.name}: expected MXFP4 experts of shape {shape}, got {w.type.name} {w.shape}")
    for b, shape, name in ((gate_b, (E, I), "gate bias"), (up_b, (E, I), "up bias"), (down_b, (E, H), "down bias")):
        if not device.is_device_array(b) or b.dtype != np.float32 or b.shape != shape:
            raise ValueError(f"{name}: expected a device float32 array of shape {shape}, got "
                             f"{getattr(b, 'dtype', None)} {getattr(b, 'shape', None)}")
    return [_rows_2d(w)[0].reshape(w.shape[0], w.shape[1], -1) for w in (gate, up, down)]


def moe_decode(gate, up, down, gate_b, up_b, down_b, x, ids, weights, *, alpha: float, limit: float, out=None,
               accumulate: bool = False, scratch=None, launch: Launch | None = None):
    """One token's MoE (spec §2.6): Σ_a weights[a] · expert ids[a] applied to x [H], the clamped SwiGLU MLP, over
    the packed MXFP4 experts (gate/up (E, I, H), down (E, H, I), float32 biases (E, I), (E, H)). `ids` int [k] and
    `weights` float32 [k] are read on the device (the router's output, no host sync); an id outside [0, E) gives
    NaN. `scratch` float32 [k, I] holds the activations (allocated if None); `accumulate` adds into `out`."""
    gate_d, up_d, down_d = _check_experts(gate, up, down, gate_b, up_b, down_b)
    E, I, H = gate.shape
    _check_vector("x", x, H)
    if not device.is_device_array(ids) or ids.dtype not in (np.int32, np.int64) or ids.ndim != 1:
        raise ValueError(f"expert ids: expected a device int32/int64 array [k], got {getattr(ids, 'dtype', None)}")
    k = ids.shape[0]
    _check_vector("expert weights", weights, k)
    if accumulate and out is None:
        raise ValueError("accumulate needs out")
    out = _check_out(out, (H,))
    scratch = _check_out(scratch, (k, I))
    cfg = launch or device.launch(k * I, device.WARP)
    _moe_gate_up[cfg.blocks, cfg.threads, device.stream()](gate_d, up_d, _e2m1_table(), gate_b, up_b, x, ids, float32(alpha),
                                          float32(limit), scratch, cfg.group)
    cfg = launch or device.launch(H, device.WARP)
    _moe_down[cfg.blocks, cfg.threads, device.stream()](down_d, _e2m1_table(), down_b, scratch, ids, weights, accumulate, out,
                                       cfg.group)
    return out


@cuda.jit
def _swiglu_rows(gate, up, gate_b, up_b, alpha, limit, out):
    n = out.shape[1]
    for idx in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
        t = idx // n
        i = idx - t * n
        out[t, i] = _swiglu(gate[t, i] + gate_b[i], up[t, i] + up_b[i], alpha, limit)


def swiglu(gate, up, gate_b, up_b, *, alpha: float, limit: float, out=None, launch: Launch | None = None):
    """Prefill's expert activation: swiglu(gate + gate_b, up + up_b) for float32 gate/up [T, I] (one expert's
    matmul outputs) and its float32 biases [I]."""
    if gate.ndim != 2 or up.shape != gate.shape or gate.dtype != np.float32 or up.dtype != np.float32:
        raise ValueError(f"gate/up must be float32 [T, I] of one shape, got {gate.shape}, {up.shape}")
    _check_vector("gate bias", gate_b, gate.shape[1])
    _check_vector("up bias", up_b, gate.shape[1])
    out = _check_out(out, gate.shape)
    cfg = launch or device.launch(gate.size)
    _swiglu_rows[cfg.blocks, cfg.threads, device.stream()](gate, up, gate_b, up_b, float32(alpha), float32(limit), out)
    return out


# --- small ops ------------------------------------------------------------------------------------------------------
@cuda.jit
def _rms_norm(x, gain, eps, out, group):
    """Spec §2.1, a group of lanes per row: x · 1/sqrt(mean(x²) + eps) · gain, the gain as stored."""
    lane, slot, per_block = _lanes(group)
    T, n = x.shape
    for base in range(cuda.blockIdx.x * per_block, T, cuda.gridDim.x * per_block):
        t = base + slot
        partial = float32(0.0)
        if t < T:
            for i in range(lane, n, group):
                partial += x[t, i] * x[t, i]
        inv = float32(1.0) / math.sqrt(_group_sum(partial, group) / float32(n) + eps)
        if t < T:
            for i in range(lane, n, group):
                out[t, i] = x[t, i] * inv * gain[i]


def rms_norm(x, gain, eps: float, *, out=None, launch: Launch | None = None):
    """RMSNorm of float32 x [T, H] with float32 gain [H] → float32 [T, H]."""
    if not device.is_device_array(x) or x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"rms_norm: x must be a device float32 [T, H], got {getattr(x, 'dtype', None)}")
    _check_vector("gain", gain, x.shape[1])
    out = _check_out(out, x.shape)
    cfg = launch or device.launch(x.shape[0], device.WARP)
    _rms_norm[cfg.blocks, cfg.threads, device.stream()](x, gain, float32(eps), out, cfg.group)
    return out


@cuda.jit
def _rope(q, k, inv_freq, concentration, start, start_ref):
    """Half-split rotation (spec §2.3) of every head of q and k at position start + start_ref[0] + t, in place: a
    thread per (t, i) pair computes cos/sin once (in float64, like the CPU tables) for all heads."""
    T = q.shape[0]
    half = inv_freq.shape[0]
    first = start + start_ref[0]
    for idx in range(cuda.grid(1), T * half, cuda.gridsize(1)):
        t = idx // half
        i = idx - t * half
        angle = float64(first + t) * inv_freq[i]
        c = float32(math.cos(angle) * concentration)
        s = float32(math.sin(angle) * concentration)
        for h in range(q.shape[1]):
            a, b = q[t, h, i], q[t, h, i + half]
            q[t, h, i] = a * c - b * s
            q[t, h, i + half] = b * c + a * s
        for h in range(k.shape[1]):
            a, b = k[t, h, i], k[t, h, i + half]
            k[t, h, i] = a * c - b * s
            k[t, h, i + half] = b * c + a * s


def _start(start):
    """(host start, device start_ref) of a start position given as an int or as a device int32 [1]."""
    if isinstance(start, (int, np.integer)):
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        return int(start), device.zero_index()
    if not device.is_device_array(start) or start.dtype != np.int32 or start.shape != (1,):
        raise ValueError(f"start must be an int or a device int32 array of shape (1,), got {start!r}")
    return 0, start


def rope(q, k, inv_freq, concentration: float, start, *, launch: Launch | None = None) -> None:
    """Rotate q [T, n_head, d] and k [T, n_kv, d] (float32, in place) for positions start + t; `inv_freq` float64
    [d/2] (YaRN-blended, model.yarn_frequencies); `start` an int or a device int32 [1] (a replayed decode step)."""
    T, _, d = q.shape
    for name, a in (("q", q), ("k", k)):
        if not device.is_device_array(a) or a.dtype != np.float32 or a.ndim != 3 or a.shape[0] != T \
                or a.shape[2] != d or not a.flags.c_contiguous:
            raise ValueError(f"rope: {name} must be a contiguous device float32 [T, heads, {d}], got {a.shape}")
    _check_vector("inv_freq", inv_freq, d // 2, np.float64)
    if d % 2:
        raise ValueError(f"rope needs an even head dimension, got {d}")
    first, start_ref = _start(start)
    cfg = launch or device.launch(T * (d // 2))
    _rope[cfg.blocks, cfg.threads, device.stream()](q, k, inv_freq, float64(concentration), first, start_ref)


@cuda.jit
def _router(logits, ids, weights):
    """Per token: the k largest logits (the lowest index first among equals) and the softmax over them (spec §2.5).
    A thread per token: E <= a few hundred, k small, so k passes over the row cost less than any cooperation."""
    T, E = logits.shape
    k = ids.shape[1]
    for t in range(cuda.grid(1), T, cuda.gridsize(1)):
        for j in range(k):
            best = -1
            best_value = float32(0.0)
            for e in range(E):
                taken = False
                for i in range(j):
                    taken = taken or ids[t, i] == e
                if not taken and (best < 0 or logits[t, e] > best_value):
                    best = e
                    best_value = logits[t, e]
            ids[t, j] = best
        top = logits[t, ids[t, 0]]
        for j in range(1, k):
            top = max(top, logits[t, ids[t, j]])
        total = float32(0.0)
        for j in range(k):
            weights[t, j] = math.exp(logits[t, ids[t, j]] - top)
            total += weights[t, j]
        for j in range(k):
            weights[t, j] /= total


def router(logits, k: int, *, ids=None, weights=None, launch: Launch | None = None):
    """Top-k of float32 logits [T, E] and the softmax over those k → (int32 ids [T, k], float32 weights [T, k])."""
    if not device.is_device_array(logits) or logits.ndim != 2 or logits.dtype != np.float32:
        raise ValueError(f"router: logits must be a device float32 [T, E], got {getattr(logits, 'dtype', None)}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"router: k must lie in [1, {E}], got {k}")
    ids = _check_out(ids, (T, k), (np.int32,))
    weights = _check_out(weights, (T, k))
    cfg = launch or device.launch(T)
    _router[cfg.blocks, cfg.threads, device.stream()](logits, ids, weights)
    return ids, weights


# --- KV cache -------------------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _quantize_q8_0(src, t, g, b, dst, scales, slot):
    """One block of 32 values to int8 and a float32 scale, llama.cpp's rule as the CPU cache stores it
    (kv_cache._store_q8_0): scale amax/127, values round(x / scale) half away from zero (exactly: the same float32
    operations)."""
    x0 = b * Q8_0_BLOCK_SIZE
    amax = float32(0.0)
    for i in range(x0, x0 + Q8_0_BLOCK_SIZE):
        amax = max(amax, abs(src[t, g, i]))
    scale = amax / float32(127.0)
    inv = float32(1.0) / scale if scale > 0 else float32(0.0)
    for i in range(x0, x0 + Q8_0_BLOCK_SIZE):
        x = src[t, g, i]
        dst[g, slot, i] = int32(x * inv + (float32(0.5) if x >= 0 else float32(-0.5)))  # int32() truncates
    scales[g, slot, b] = scale


@cuda.jit
def _store(k, v, start, start_ref, keys, values, key_scales, value_scales):
    """keys/values[g, p % capacity] = k/v[t, g] for p = start + start_ref[0] + t, in the cache's type: a thread per
    value for float32/float16 (float16 rounds to nearest even, as NumPy's astype), per block of 32 values for q8_0
    (the scales' last axis is empty for the float types)."""
    T, n_kv, d = k.shape
    capacity = keys.shape[1]
    quantized = key_scales.shape[2] > 0
    units = d // Q8_0_BLOCK_SIZE if quantized else d
    first = start + start_ref[0]
    for idx in range(cuda.grid(1), T * n_kv * units, cuda.gridsize(1)):
        t = idx // (n_kv * units)
        g = (idx // units) % n_kv
        u = idx % units
        if first + t >= 0:
            slot = (first + t) % capacity
            if quantized:
                _quantize_q8_0(k, t, g, u, keys, key_scales, slot)
                _quantize_q8_0(v, t, g, u, values, value_scales, slot)
            else:
                keys[g, slot, u] = k[t, g, u]
                values[g, slot, u] = v[t, g, u]


_CACHE_DTYPES = (np.float32, np.float16, np.int8)


def _cache_arrays(keys, values, key_scales, value_scales):
    """The cache arrays as the kernels read them: f16 bits viewed as float16; empty scales [n_kv, 1, 0] for the
    unquantized types."""
    keys, values = (a.view(np.float16) if a.dtype == np.uint16 else a for a in (keys, values))
    if keys.dtype not in _CACHE_DTYPES or values.dtype != keys.dtype or keys.shape != values.shape \
            or keys.ndim != 3 or not (keys.flags.c_contiguous and values.flags.c_contiguous):
        raise ValueError(f"KV cache: keys/values must be contiguous [n_kv, capacity, d] of one type among f32, f16 "
                         f"(or its uint16 bits), int8; got {keys.dtype} {keys.shape}, {values.dtype} {values.shape}")
    n_kv, capacity, d = keys.shape
    if keys.dtype == np.int8:
        shape = (n_kv, capacity, d // Q8_0_BLOCK_SIZE)
        if d % Q8_0_BLOCK_SIZE or any(s is None or s.dtype != np.float32 or s.shape != shape
                                      for s in (key_scales, value_scales)):
            raise ValueError(f"KV cache: q8_0 needs float32 scales {shape} and a head dimension that is a multiple "
                             f"of {Q8_0_BLOCK_SIZE}")
    else:
        if key_scales is not None or value_scales is not None:
            raise ValueError("KV cache: only q8_0 has scales")
        key_scales = value_scales = _empty(np.float32, (n_kv, 1, 0))
    return keys, values, key_scales, value_scales


def kv_store(keys, values, key_scales, value_scales, k, v, start, *, launch: Launch | None = None) -> None:
    """Write float32 k/v [T, n_kv, d] of positions start.. into a cache layer's ring (slot = position % capacity),
    as f32, f16 or q8_0 (int8 + float32 scales per 32, key_scales/value_scales [n_kv, capacity, d/32], None for the
    float types). `start`: an int or a device int32 [1] (a replayed decode step)."""
    keys, values, key_scales, value_scales = _cache_arrays(keys, values, key_scales, value_scales)
    n_kv, capacity, d = keys.shape
    for name, a in (("k", k), ("v", v)):
        if not device.is_device_array(a) or a.dtype != np.float32 or a.ndim != 3 or a.shape[1:] != (n_kv, d):
            raise ValueError(f"kv_store: {name} must be a device float32 [T, {n_kv}, {d}], got {a.shape}")
    T = k.shape[0]
    if v.shape[0] != T or T > capacity:
        raise ValueError(f"kv_store: {T} positions (v: {v.shape[0]}) must fit the {capacity} slots")
    first, start_ref = _start(start)
    cfg = launch or device.launch(T * n_kv * (d // Q8_0_BLOCK_SIZE if keys.dtype == np.int8 else d))
    _store[cfg.blocks, cfg.threads, device.stream()](k, v, first, start_ref, keys, values, key_scales, value_scales)


# --- attention ------------------------------------------------------------------------------------------------------
@cuda.jit
def _attend(q, keys, key_scales, values, value_scales, start, start_ref, window, sinks, scale, out, group):
    """out[t, h] = attention with sinks (spec §2.4) of q[t, h], at position p = start + start_ref[0] + t, over the
    cached positions max(0, p - window + 1) .. p (slot position % capacity) of KV head h // (n_head / n_kv).

    A group of lanes per (query, head), each lane holding every group-th dimension; the online softmax starts from
    the sink's logit (its exp is the 1 in the denominator; it has no value). Items run query-major, head-minor, so
    a block's warps are heads of one KV group and read the same key rows (L1 hits). The key loop covers the union
    of the block's ranges, masked per item, so its shuffles are block-uniform.
    """
    T, n_head, d = q.shape
    capacity = keys.shape[1]
    per_kv = n_head // keys.shape[0]
    lane, slot, per_block = _lanes(group)
    first = start + start_ref[0]
    n_items = T * n_head
    acc = cuda.local.array(MAX_ACC, float32)
    for base in range(cuda.blockIdx.x * per_block, n_items, cuda.gridDim.x * per_block):
        item = min(base + slot, n_items - 1)
        t = item // n_head
        h = item - t * n_head
        g = h // per_kv
        pos = first + t
        lo = max(0, pos - window + 1)
        block_lo = max(0, first + base // n_head - window + 1)
        block_hi = first + min(base + per_block - 1, n_items - 1) // n_head
        n_acc = (d - lane + group - 1) // group  # this lane's dimensions: lane, lane + group, ...
        m = sinks[h]  # running maximum of the logits, from the sink's
        denom = float32(1.0)  # Σ exp(logit - m), the sink's share included
        for j in range(n_acc):
            acc[j] = float32(0.0)
        for p in range(block_lo, block_hi + 1):
            kv_slot = p % capacity
            partial = float32(0.0)
            for x in range(lane, d, group):
                partial += q[t, h, x] * _cache_value(keys, key_scales, g, kv_slot, x)
            score = _group_sum(partial, group) * scale
            if lo <= p <= pos:
                if score > m:
                    rescale = math.exp(m - score)
                    denom *= rescale
                    for j in range(n_acc):
                        acc[j] *= rescale
                    m = score
                weight = math.exp(score - m)
                denom += weight
                for j in range(n_acc):
                    acc[j] += weight * _cache_value(values, value_scales, g, kv_slot, lane + j * group)
        if base + slot < n_items:
            for j in range(n_acc):
                out[t, h, lane + j * group] = acc[j] / denom


def attend(q, keys, values, key_scales, value_scales, start, window: int, sinks, scale: float, *, out=None,
           launch: Launch | None = None):
    """Attention with sinks of float32 q [T, n_head, d] at positions start.. over a cache layer (keys/values
    [n_kv, capacity, d] in f32, f16 (or its uint16 bits) or q8_0 int8 with float32 scales [n_kv, capacity, d/32]),
    each query seeing positions max(0, p - window + 1) .. p (window = the context length in full layers). The
    layer must already hold these positions (kv_store first). `start`: an int, or a device int32 [1] for a replayed
    decode step (then the caller guarantees the window fits the ring). → float32 [T, n_head, d]."""
    keys, values, key_scales, value_scales = _cache_arrays(keys, values, key_scales, value_scales)
    n_kv, capacity, d = keys.shape
    if not device.is_device_array(q) or q.dtype != np.float32 or q.ndim != 3 or q.shape[2] != d \
            or q.shape[1] % n_kv:
        raise ValueError(f"attend: q must be a device float32 [T, n_head, {d}] with n_head a multiple of {n_kv}, "
                         f"got {getattr(q, 'dtype', None)} {getattr(q, 'shape', None)}")
    T, n_head, _ = q.shape
    _check_vector("sinks", sinks, n_head)
    if window < 1:
        raise ValueError(f"attend: window must be >= 1, got {window}")
    first, start_ref = _start(start)
    if start_ref is device.zero_index() and max(0, first - window + 1) + capacity < first + T:
        raise ValueError(f"attend: positions {max(0, first - window + 1)}..{first + T - 1} do not fit {capacity} "
                         f"slots")
    cfg = launch or device.launch(T * n_head, device.WARP)
    if -(-d // cfg.group) > MAX_ACC:
        raise ValueError(f"attend: head dimension {d} needs lane groups of at least {-(-d // MAX_ACC)}")
    out = _check_out(out, q.shape)
    _attend[cfg.blocks, cfg.threads, device.stream()](q, keys, key_scales, values, value_scales, first, start_ref, window, sinks,
                                     float32(scale), out, cfg.group)
    return out
