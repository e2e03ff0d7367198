"""Row dot products over packed weights, and row decoders, written as LLVM vector code that Numba inlines into the
kernels; the packed formats' constants.

Each `row_dot_*` computes `Σ w[i]·x[i]` for one weight row stored as in the file and float32 `x`, accumulating in
float32 vectors; each `dequant_row_*` writes a row's float32 values (weights, or a KV cache's f16 / q8_0 rows).
MXFP4 decodes a block's 32 nibbles with two byte shuffles (`pshufb`: a 16-entry table lookup in one instruction),
Q8_0 and BF16/F16 widen and convert in registers; LLVM picks the widest vectors the CPU has.

The shuffle is x86's (SSSE3, every x86-64 CPU since 2006); elsewhere the same functions are plain loops over a
lookup table (`*_scalar`, which the tests also check). Numba's cache does not follow imports: after editing this
file, delete `__pycache__/*.nbi` and `*.nbc` so the kernels that inline it are rebuilt.
"""

from __future__ import annotations

import platform

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..format import mxfp4

# The fastmath flags of every kernel that sums: reassociation lets LLVM vectorize the reductions (results differ
# from NumPy only in rounding order). Helpers inlined into a kernel take the kernel's flags, so kernels that call
# them must set these or the sums are not vectorized.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

MXFP4_BLOCK_SIZE, MXFP4_BLOCK_BYTES = mxfp4.BLOCK_VALUES, mxfp4.BLOCK_BYTES  # 32 values: e8m0 scale + 16 bytes
Q8_0_BLOCK_SIZE, Q8_0_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]  # 32 values: f16 scale + 32 int8


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) → float32, exactly: bf16 is the top half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


_KVALUES = mxfp4.KVALUES.astype(np.float32)
_E8M0_HALF = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - 128).astype(np.float32)  # 2^(e-128)
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TO_F32 = bf16_to_f32(np.arange(65536, dtype=np.uint16))

SIMD = platform.machine().lower() in ("x86_64", "amd64")

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
# Weight rows are read once, front to back, and the row after this one comes next: asking for data this far ahead
# doubles the read rate (the hardware prefetcher alone leaves the loop waiting on memory).
_PREFETCH_BYTES = 2048
_V16F = ir.VectorType(_F32, 16)
_FAST = ("fast",)


# --- LLVM helpers ---------------------------------------------------------------------------------------------------
def _splat(builder, value, vtype):
    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vtype.count), [ir.Constant(_I32, 0)] * vtype.count))


def _load(builder, ptr, offset, vtype, align):
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vtype.as_pointer()), align=align)


def _hsum(builder, v):
    total = builder.extract_element(v, ir.Constant(_I32, 0))
    for i in range(1, v.type.count):
        total = builder.fadd(total, builder.extract_element(v, ir.Constant(_I32, i)), flags=_FAST)
    return total


def _pointers(context, builder, signature, args):
    row = context.make_array(signature.args[0])(context, builder, args[0])
    x = context.make_array(signature.args[1])(context, builder, args[1])
    return builder.bitcast(row.data, _I8.as_pointer()), builder.bitcast(x.data, _F32.as_pointer())


def _const(builder, n, value):
    return ir.Constant(n.type, value)


def _prefetch(builder, ptr, offset):
    """Prefetch (read, keep in all cache levels) `_PREFETCH_BYTES` past ptr + offset; never faults."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32,
                                                                                        _I32]), "llvm.prefetch.p0")
    target = builder.gep(ptr, [builder.add(offset, ir.Constant(offset.type, _PREFETCH_BYTES))])
    builder.call(fn, [target, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


# --- MXFP4 ----------------------------------------------------------------------------------------------------------
def _mxfp4_block(builder, wp, b):
    """Block b of a block_mxfp4 row at wp: its scale 2^(e-128) (float) and its 32 values as two <16 x float>
    (elements 0..15 from the low nibbles, 16..31 from the high), before scaling."""
    v16i8 = ir.VectorType(_I8, 16)
    pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i8, [v16i8, v16i8]),
                                            "llvm.x86.ssse3.pshuf.b.128")
    table = ir.Constant(v16i8, [ir.Constant(_I8, int(v) & 0xFF) for v in mxfp4.KVALUES])
    base = builder.mul(b, _const(builder, b, MXFP4_BLOCK_BYTES))
    _prefetch(builder, wp, base)
    # The scale built as float bits: e >= 2 → (e-1) << 23; e < 2 → the denormal 0x00200000 << e.
    e = builder.zext(builder.load(builder.gep(wp, [base])), _I32)
    normal = builder.shl(builder.sub(e, ir.Constant(_I32, 1)), ir.Constant(_I32, 23))
    denormal = builder.shl(ir.Constant(_I32, 0x00200000), e)
    scale = builder.bitcast(builder.select(builder.icmp_unsigned("<", e, ir.Constant(_I32, 2)), denormal, normal),
                            _F32)
    qs = _load(builder, wp, builder.add(base, _const(builder, b, 1)), v16i8, 1)
    low4 = ir.Constant(v16i8, [ir.Constant(_I8, 15)] * 16)
    four = ir.Constant(v16i8, [ir.Constant(_I8, 4)] * 16)
    lo = builder.sitofp(builder.call(pshufb, [table, builder.and_(qs, low4)]), _V16F)
    hi = builder.sitofp(builder.call(pshufb, [table, builder.lshr(qs, four)]), _V16F)
    return scale, lo, hi


@intrinsic
def _row_dot_mxfp4_simd(typingctx, row, x, n_blocks):
    sig = types.float32(row, x, n_blocks)

    def codegen(context, builder, signature, args):
        wp, xp = _pointers(context, builder, signature, args)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16))
        with cgutils.for_range(builder, args[2]) as loop:
            b = loop.index
            scale, lo, hi = _mxfp4_block(builder, wp, b)
            xoff = builder.mul(b, _const(builder, b, 32))
            x0 = _load(builder, xp, xoff, _V16F, 4)
            x1 = _load(builder, xp, builder.add(xoff, _const(builder, b, 16)), _V16F, 4)
            block = builder.fadd(builder.fmul(lo, x0, flags=_FAST), builder.fmul(hi, x1, flags=_FAST), flags=_FAST)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(block, _splat(builder, scale, _V16F),
                                                                       flags=_FAST), flags=_FAST), acc)
        return _hsum(builder, builder.load(acc))

    return sig, codegen


@intrinsic
def _dequant_row_mxfp4_simd(typingctx, row, out, n_blocks):
    sig = types.void(row, out, n_blocks)

    def codegen(context, builder, signature, args):
        wp, op = _pointers(context, builder, signature, args)
        with cgutils.for_range(builder, args[2]) as loop:
            b = loop.index
            scale, lo, hi = _mxfp4_block(builder, wp, b)
            scale = _splat(builder, scale, _V16F)
            ooff = builder.mul(b, _const(builder, b, 32))
            for off, v in ((ooff, lo), (builder.add(ooff, _const(builder, b, 16)), hi)):
                ptr = builder.bitcast(builder.gep(op, [off]), _V16F.as_pointer())
                builder.store(builder.fmul(v, scale, flags=_FAST), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def dequant_row_mxfp4_scalar(row, out, n_blocks):
    for b in range(n_blocks):
        o = b * MXFP4_BLOCK_BYTES
        d = _E8M0_HALF[row[o]]
        for j in range(16):
            q = row[o + 1 + j]
            out[b * MXFP4_BLOCK_SIZE + j] = _KVALUES[q & 15] * d
            out[b * MXFP4_BLOCK_SIZE + 16 + j] = _KVALUES[q >> 4] * d


@njit(cache=True, inline="always", fastmath=FASTMATH)
def row_dot_mxfp4_scalar(row, x, n_blocks):
    acc = np.float32(0.0)
    for b in range(n_blocks):
        o = b * MXFP4_BLOCK_BYTES
        s = np.float32(0.0)
        for j in range(16):
            q = row[o + 1 + j]
            s += _KVALUES[q & 15] * x[b * MXFP4_BLOCK_SIZE + j] + _KVALUES[q >> 4] * x[b * MXFP4_BLOCK_SIZE + 16 + j]
        acc += s * _E8M0_HALF[row[o]]
    return acc


# --- Q8_0 -----------------------------------------------------------------------------------------------------------
@intrinsic
def _row_dot_q8_0_simd(typingctx, row, x, n_blocks):
    sig = types.float32(row, x, n_blocks)

    def codegen(context, builder, signature, args):
        wp, xp = _pointers(context, builder, signature, args)
        nb = args[2]
        v16i8 = ir.VectorType(_I8, 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            base = builder.mul(b, _const(builder, b, Q8_0_BLOCK_BYTES))
            _prefetch(builder, wp, base)
            d_bits = builder.load(builder.bitcast(builder.gep(wp, [base]), _I16.as_pointer()), align=1)
            d = builder.fpext(builder.bitcast(d_bits, ir.HalfType()), _F32)
            q0 = builder.sitofp(_load(builder, wp, builder.add(base, _const(builder, b, 2)), v16i8, 1), _V16F)
            q1 = builder.sitofp(_load(builder, wp, builder.add(base, _const(builder, b, 18)), v16i8, 1), _V16F)
            xoff = builder.mul(b, _const(builder, b, 32))
            x0 = _load(builder, xp, xoff, _V16F, 4)
            x1 = _load(builder, xp, builder.add(xoff, _const(builder, b, 16)), _V16F, 4)
            block = builder.fadd(builder.fmul(q0, x0, flags=_FAST), builder.fmul(q1, x1, flags=_FAST), flags=_FAST)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(block, _splat(builder, d, _V16F),
                                                                       flags=_FAST), flags=_FAST), acc)
        return _hsum(builder, builder.load(acc))

    return sig, codegen


@njit(cache=True, inline="always")
def _q8_0_scale(row, o):
    """The f16 scale that opens the block at byte o, as float32."""
    return F16_TO_F32[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@njit(cache=True, inline="always", fastmath=FASTMATH)
def row_dot_q8_0_scalar(row, x, n_blocks):
    acc = np.float32(0.0)
    for b in range(n_blocks):
        o = b * Q8_0_BLOCK_BYTES
        s = np.float32(0.0)
        for j in range(Q8_0_BLOCK_SIZE):
            s += np.float32(np.int8(row[o + 2 + j])) * x[b * Q8_0_BLOCK_SIZE + j]
        acc += s * _q8_0_scale(row, o)
    return acc


@intrinsic
def _dequant_q8_split_simd(typingctx, values, scales, out):
    """out[32b + i] = values[32b + i] · scales[b] over the whole row (int8 values, float32 scales)."""
    sig = types.void(values, scales, out)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args)]
        vp = builder.bitcast(arrays[0].data, _I8.as_pointer())
        sp, op = (builder.bitcast(a.data, _F32.as_pointer()) for a in arrays[1:])
        v16i8 = ir.VectorType(_I8, 16)
        n_blocks = builder.extract_value(arrays[1].shape, 0)
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            scale = _splat(builder, builder.load(builder.gep(sp, [b])), _V16F)
            for half in (0, 16):
                off = builder.add(builder.mul(b, _const(builder, b, Q8_0_BLOCK_SIZE)), _const(builder, b, half))
                q = builder.sitofp(_load(builder, vp, off, v16i8, 1), _V16F)
                builder.store(builder.fmul(q, scale, flags=_FAST),
                              builder.bitcast(builder.gep(op, [off]), _V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def dequant_row_q8_split_scalar(values, scales, out):
    for b in range(scales.shape[0]):
        for i in range(b * Q8_0_BLOCK_SIZE, (b + 1) * Q8_0_BLOCK_SIZE):
            out[i] = np.float32(values[i]) * scales[b]


@njit(cache=True, inline="always")
def dequant_row_q8_0(row, out, n_blocks):
    for b in range(n_blocks):
        o = b * Q8_0_BLOCK_BYTES
        d = _q8_0_scale(row, o)
        for j in range(Q8_0_BLOCK_SIZE):
            out[b * Q8_0_BLOCK_SIZE + j] = np.float32(np.int8(row[o + 2 + j])) * d


# --- BF16 / F16 -----------------------------------------------------------------------------------------------------
def _row_dot_16bit(bf16: bool):
    @intrinsic
    def row_dot(typingctx, row, x, n_chunks):
        """Σ over the first 16·n_chunks elements."""
        sig = types.float32(row, x, n_chunks)

        def codegen(context, builder, signature, args):
            wp, xp = _pointers(context, builder, signature, args)
            n = args[2]
            v16i16 = ir.VectorType(_I16, 16)
            acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16))
            with cgutils.for_range(builder, n) as loop:
                i = builder.mul(loop.index, _const(builder, loop.index, 16))
                _prefetch(builder, wp, builder.add(i, i))  # byte offset of element i
                bits = builder.load(builder.bitcast(builder.gep(builder.bitcast(wp, _I16.as_pointer()), [i]),
                                                    v16i16.as_pointer()), align=2)
                if bf16:  # bf16 is the top half of a float32
                    w = builder.bitcast(builder.shl(builder.zext(bits, ir.VectorType(_I32, 16)),
                                                    ir.Constant(ir.VectorType(_I32, 16), [ir.Constant(_I32, 16)] * 16)),
                                        _V16F)
                else:
                    w = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 16)), _V16F)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(w, _load(builder, xp, i, _V16F, 4),
                                                                           flags=_FAST), flags=_FAST), acc)
            return _hsum(builder, builder.load(acc))

        return sig, codegen

    return row_dot


_row_dot_bf16_chunks = _row_dot_16bit(bf16=True)
_row_dot_f16_chunks = _row_dot_16bit(bf16=False)


@intrinsic
def _dequant_f16_chunks(typingctx, row, out, n_chunks):
    """out[:16·n_chunks] = the f16 bit patterns row[:16·n_chunks] as float32."""
    sig = types.void(row, out, n_chunks)

    def codegen(context, builder, signature, args):
        wp, op = _pointers(context, builder, signature, args)
        v16i16 = ir.VectorType(_I16, 16)
        with cgutils.for_range(builder, args[2]) as loop:
            i = builder.mul(loop.index, _const(builder, loop.index, 16))
            bits = builder.load(builder.bitcast(builder.gep(builder.bitcast(wp, _I16.as_pointer()), [i]),
                                                v16i16.as_pointer()), align=2)
            values = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 16)), _V16F)
            builder.store(values, builder.bitcast(builder.gep(op, [i]), _V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always", fastmath=FASTMATH)
def row_dot_16bit_scalar(row, table, x, start):
    acc = np.float32(0.0)
    for i in range(start, x.shape[0]):
        acc += table[row[i]] * x[i]
    return acc


@njit(cache=True, inline="always")
def dequant_row_f16_scalar(row, out, start):
    for i in range(start, out.shape[0]):
        out[i] = F16_TO_F32[row[i]]


if SIMD:
    @njit(cache=True, inline="always")
    def row_dot_mxfp4(row, x, n_blocks):
        return _row_dot_mxfp4_simd(row, x, n_blocks)

    @njit(cache=True, inline="always")
    def row_dot_q8_0(row, x, n_blocks):
        return _row_dot_q8_0_simd(row, x, n_blocks)

    @njit(cache=True, inline="always")
    def dequant_row_mxfp4(row, out, n_blocks):
        _dequant_row_mxfp4_simd(row, out, n_blocks)

    @njit(cache=True, inline="always")
    def row_dot_bf16(row, x):
        n = x.shape[0] // 16
        return _row_dot_bf16_chunks(row, x, n) + row_dot_16bit_scalar(row, BF16_TO_F32, x, n * 16)

    @njit(cache=True, inline="always")
    def row_dot_f16(row, x):
        n = x.shape[0] // 16
        return _row_dot_f16_chunks(row, x, n) + row_dot_16bit_scalar(row, F16_TO_F32, x, n * 16)

    @njit(cache=True, inline="always")
    def dequant_row_f16(row, out):
        n = out.shape[0] // 16
        _dequant_f16_chunks(row, out, n)
        dequant_row_f16_scalar(row, out, n * 16)

    @njit(cache=True, inline="always")
    def dequant_row_q8_split(values, scales, out):
        """A row of the KV cache's q8_0: int8 values, their float32 scales (one per 32) in a separate row."""
        _dequant_q8_split_simd(values, scales, out)
else:
    row_dot_mxfp4 = row_dot_mxfp4_scalar
    row_dot_q8_0 = row_dot_q8_0_scalar
    dequant_row_mxfp4 = dequant_row_mxfp4_scalar

    @njit(cache=True, inline="always")
    def row_dot_bf16(row, x):
        return row_dot_16bit_scalar(row, BF16_TO_F32, x, 0)

    @njit(cache=True, inline="always")
    def row_dot_f16(row, x):
        return row_dot_16bit_scalar(row, F16_TO_F32, x, 0)

    @njit(cache=True, inline="always")
    def dequant_row_f16(row, out):
        dequant_row_f16_scalar(row, out, 0)

    dequant_row_q8_split = dequant_row_q8_split_scalar
