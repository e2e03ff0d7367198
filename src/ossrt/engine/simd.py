"""Row dot products over packed weights, and row decoders, written as LLVM vector code that Numba inlines into the
kernels; the packed formats' constants.

Each `row_dot_*` computes `Σ w[i]·x[i]` for one weight row stored as in the file and float32 `x`, accumulating in
float32 vectors; each `dequant_row_*` writes a row's float32 values (weights, or a KV cache's f16 / q8_0 rows).
MXFP4 turns a block's 32 nibbles into int8 E2M1 values (×2) 16 at a time, then to float; Q8_0 and BF16/F16 widen
and convert in registers; LLVM picks the widest vectors the CPU has.

Only two steps depend on the instruction set, picked once by `platform.machine()` (`ISA`):
- the nibble decoding: x86's byte shuffle `pshufb` and AArch64's `tbl` are a 16-entry table lookup in one
  instruction; elsewhere (`*_portable`) a few branch-free byte operations compute the same values;
- f16 → f32: a native conversion on x86 and AArch64; elsewhere (`*_portable`) integer bit arithmetic for f16 rows
  and a table load for Q8_0's one scale a block, because LLVM would lower the conversion to a library call the JIT
  cannot resolve.
The portable functions are generic vector code, so they run (and are tested) on any CPU, x86 included. Numba's
cache does not follow imports: after editing this file, delete `__pycache__/*.nbi` and `*.nbc` so the kernels that
inline it are rebuilt.
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


with np.errstate(invalid="ignore"):  # AArch64 flags the signalling NaNs it quiets
    F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TO_F32 = bf16_to_f32(np.arange(65536, dtype=np.uint16))

# "x86", "aarch64" or "portable": which table lookup decodes MXFP4 and how f16 is widened (module docstring).
ISA = {"x86_64": "x86", "amd64": "x86", "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                                                     "portable")

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
# Weight rows are read once, front to back, and the row after this one comes next: asking for data this far ahead
# doubles the read rate (the hardware prefetcher alone leaves the loop waiting on memory).
_PREFETCH_BYTES = 2048
_V16F = ir.VectorType(_F32, 16)
_F16_TABLE = "ossrt_f16_to_f32"  # the name of F16_TO_F32 in a module that loads from it (`_f16_table`)
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


def _i64(value):
    return ir.Constant(_I64, value)


def _prefetch_line(builder, address, locality=3):
    """Prefetch for reading the cache line at `address` (an i8*): `locality` 3 keeps it in every cache level, 2
    in L2 and beyond; never faults."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32,
                                                                                        _I32]), "llvm.prefetch.p0")
    builder.call(fn, [address, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])


def _prefetch(builder, ptr, offset):
    """Prefetch (read, keep in all cache levels) `_PREFETCH_BYTES` past ptr + offset."""
    _prefetch_line(builder, builder.gep(ptr, [builder.add(offset, ir.Constant(offset.type, _PREFETCH_BYTES))]))


# --- f16 / bf16 → f32 ---------------------------------------------------------------------------------------------
def _shaped(value, element):
    """The type `element`, or a vector of it as long as value's vector."""
    return ir.VectorType(element, value.type.count) if isinstance(value.type, ir.VectorType) else element


def _like(value, constant):
    """An ir.Constant, splatted to value's vector shape if value is a vector."""
    if isinstance(value.type, ir.VectorType):
        return ir.Constant(_shaped(value, constant.type), [constant] * value.type.count)
    return constant


def _as_i32(builder, bits):
    return builder.zext(bits, _shaped(bits, _I32))


def _as_f32(builder, value):
    return builder.bitcast(value, _shaped(value, _F32))


def _f16_native(builder, bits):
    """f16 bit patterns (i16, scalar or vector) → float: the CPU's conversion instruction."""
    return builder.fpext(builder.bitcast(bits, _shaped(bits, ir.HalfType())), _shaped(bits, _F32))


def _f16_integer(builder, bits):
    """f16 bit patterns (i16, scalar or vector) → float by integer arithmetic, exactly (denormals, inf, NaN too):
    exponent and mantissa move up 13 bits and the exponent is rebiased by 127 - 15; a maximal exponent (inf/NaN)
    stays maximal; a denormal is built as 2^-14·(1 + m/1024) and 2^-14 subtracted, which is exact."""
    c = lambda v: _like(bits, ir.Constant(_I32, v))  # noqa: E731
    h = _as_i32(builder, bits)
    sign = builder.shl(builder.and_(h, c(0x8000)), c(16))
    shifted = builder.shl(builder.and_(h, c(0x7FFF)), c(13))
    exponent = builder.and_(shifted, c(0x7C00 << 13))
    normal = builder.add(shifted, c(112 << 23))
    special = builder.add(normal, c(112 << 23))
    denormal = builder.bitcast(builder.fsub(_as_f32(builder, builder.add(normal, c(1 << 23))),
                                            _as_f32(builder, c(113 << 23))), h.type)
    value = builder.select(builder.icmp_unsigned("==", exponent, c(0x7C00 << 13)), special,
                           builder.select(builder.icmp_unsigned("==", exponent, c(0)), denormal, normal))
    return _as_f32(builder, builder.or_(value, sign))


def _f16_table(builder, bits):
    """One f16 bit pattern (i16) → float by a load from `F16_TO_F32`, kept as a constant of the module: for a Q8_0
    block's scale, one load costs less than the dozen operations of `_f16_integer`."""
    try:
        table = builder.module.get_global(_F16_TABLE)
    except KeyError:
        data = bytearray(F16_TO_F32.tobytes())
        table = ir.GlobalVariable(builder.module, ir.ArrayType(_I8, len(data)), _F16_TABLE)
        table.linkage, table.global_constant, table.align = "internal", True, 4
        table.initializer = ir.Constant(table.type.pointee, data)
    return builder.load(builder.gep(builder.bitcast(table, _F32.as_pointer()), [builder.zext(bits, _I32)]), align=4)


def _bf16_widen(builder, bits):
    """bf16 bit patterns → float: bf16 is the top half of a float32."""
    return _as_f32(builder, builder.shl(_as_i32(builder, bits), _like(bits, ir.Constant(_I32, 16))))


# --- MXFP4 ----------------------------------------------------------------------------------------------------------
_V16I8 = ir.VectorType(_I8, 16)


_LOW4 = ir.Constant(_V16I8, [ir.Constant(_I8, 15)] * 16)
_FOUR = ir.Constant(_V16I8, [ir.Constant(_I8, 4)] * 16)


def _nibble_lookup(builder, qs, name, values):
    """Code bytes (a block's 16, or several blocks' side by side) → two vectors as wide of values[nibble], of the
    low nibbles and of the high (for one block: its elements 0..15 and 16..31), by a table lookup instruction `name`
    (table, indices) that looks up within each 16 bytes, as pshufb does."""
    n = qs.type.count
    vi8 = ir.VectorType(_I8, n)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi8, [vi8, vi8]), name)
    table = ir.Constant(vi8, [ir.Constant(_I8, int(v) & 0xFF) for v in np.tile(values, n // 16)])
    low4, four = (ir.Constant(vi8, [ir.Constant(_I8, v)] * n) for v in (15, 4))
    return builder.call(fn, [table, builder.and_(qs, low4)]), builder.call(fn, [table, builder.lshr(qs, four)])


def _byte_table_lookup(name):
    """A block's 16 code bytes → its 32 values as two <16 x float> (unscaled kvalues) by `_nibble_lookup`."""
    def decode(builder, qs):
        return tuple(builder.sitofp(v, _V16F) for v in _nibble_lookup(builder, qs, name, mxfp4.KVALUES))
    return decode


_decode_pshufb = _byte_table_lookup("llvm.x86.ssse3.pshuf.b.128")
_decode_tbl = _byte_table_lookup("llvm.aarch64.neon.tbl1.v16i8")


def _decode_arithmetic(builder, qs):
    """The same values as `_byte_table_lookup`'s (kvalues: sign bit 3, magnitudes 0 1 2 3 4 6 8 12) without a
    table: for m = nibble & 7, |v| = m + max(m - 4, 0) + 2·max(m - 6, 0); the sign negates as (v ^ s) - s with
    s = 0 or -1 (on AVX-512 a select costs more mask-register operations). Plain byte operations on all 32 nibbles
    as one vector, so any vector ISA runs them as wide as it can (16 bytes at a time on NEON, 32 on AVX2)."""
    v32i8 = ir.VectorType(_I8, 32)
    c = lambda v: ir.Constant(v32i8, [ir.Constant(_I8, v)] * 32)  # noqa: E731
    both = builder.shuffle_vector(builder.and_(qs, _LOW4), builder.lshr(qs, _FOUR),
                                  ir.Constant(ir.VectorType(_I32, 32), list(range(32))))

    def above(m, k):  # max(m - k, 0)
        return builder.select(builder.icmp_unsigned(">", m, c(k)), builder.sub(m, c(k)), c(0))

    m = builder.and_(both, c(7))
    magnitude = builder.add(builder.add(m, above(m, 4)), builder.shl(above(m, 6), c(1)))
    sign = builder.ashr(builder.shl(both, c(4)), c(7))
    values = builder.sitofp(builder.sub(builder.xor(magnitude, sign), sign), ir.VectorType(_F32, 32))
    return tuple(builder.shuffle_vector(values, values, ir.Constant(ir.VectorType(_I32, 16), list(range(k, k + 16))))
                 for k in (0, 16))


# A block's scale byte e means 2^(e-128) with the values at twice their E2M1 size (kvalues): read from a table, one
# load that folds into the broadcast, where building the float bits took six integer operations (7-10 % of a
# compute-bound matvec's time on AVX-512).
_E8M0_HALF = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - 128).astype(np.float32)
_E8M0_TABLE = "ossrt_e8m0_half"


def _e8m0_table(builder):
    module = builder.module
    if _E8M0_TABLE not in module.globals:
        array = ir.ArrayType(_F32, 256)
        table = ir.GlobalVariable(module, array, _E8M0_TABLE)
        table.initializer = ir.Constant(array, [ir.Constant(_F32, float(v)) for v in _E8M0_HALF])
        table.global_constant = True
        table.linkage = "internal"
    return module.globals[_E8M0_TABLE]


def _mxfp4_block(builder, wp, b, decode):
    """Block b of a block_mxfp4 row at wp: its scale 2^(e-128) (float) and its 32 values as two vectors of 16
    (elements 0..15 from the low nibbles, 16..31 from the high), before scaling; `decode` turns the code bytes
    into values (floats here; int8's bytes for vpdpbusd)."""
    base = builder.mul(b, _const(builder, b, MXFP4_BLOCK_BYTES))
    _prefetch(builder, wp, base)
    e = builder.zext(builder.load(builder.gep(wp, [base])), _I32)
    scale = builder.load(builder.gep(_e8m0_table(builder), [ir.Constant(_I32, 0), e]))
    lo, hi = decode(builder, _load(builder, wp, builder.add(base, _const(builder, b, 1)), _V16I8, 1))
    return scale, lo, hi


def _row_dot_mxfp4_ir(decode):
    @intrinsic
    def row_dot(typingctx, row, x, n_blocks):
        sig = types.float32(row, x, n_blocks)

        def codegen(context, builder, signature, args):
            wp, xp = _pointers(context, builder, signature, args)
            acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16))
            with cgutils.for_range(builder, args[2]) as loop:
                b = loop.index
                scale, lo, hi = _mxfp4_block(builder, wp, b, decode)
                xoff = builder.mul(b, _const(builder, b, 32))
                x0 = _load(builder, xp, xoff, _V16F, 4)
                x1 = _load(builder, xp, builder.add(xoff, _const(builder, b, 16)), _V16F, 4)
                block = builder.fadd(builder.fmul(lo, x0, flags=_FAST), builder.fmul(hi, x1, flags=_FAST),
                                     flags=_FAST)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(block, _splat(builder, scale, _V16F),
                                                                           flags=_FAST), flags=_FAST), acc)
            return _hsum(builder, builder.load(acc))

        return sig, codegen

    return row_dot


def _dequant_row_mxfp4_ir(decode):
    @intrinsic
    def dequant_row(typingctx, row, out, n_blocks):
        sig = types.void(row, out, n_blocks)

        def codegen(context, builder, signature, args):
            wp, op = _pointers(context, builder, signature, args)
            with cgutils.for_range(builder, args[2]) as loop:
                b = loop.index
                scale, lo, hi = _mxfp4_block(builder, wp, b, decode)
                scale = _splat(builder, scale, _V16F)
                ooff = builder.mul(b, _const(builder, b, 32))
                for off, v in ((ooff, lo), (builder.add(ooff, _const(builder, b, 16)), hi)):
                    ptr = builder.bitcast(builder.gep(op, [off]), _V16F.as_pointer())
                    builder.store(builder.fmul(v, scale, flags=_FAST), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dequant_row


_row_dot_mxfp4_pshufb, _dequant_row_mxfp4_pshufb = _row_dot_mxfp4_ir(_decode_pshufb), \
    _dequant_row_mxfp4_ir(_decode_pshufb)
_row_dot_mxfp4_tbl, _dequant_row_mxfp4_tbl = _row_dot_mxfp4_ir(_decode_tbl), _dequant_row_mxfp4_ir(_decode_tbl)
row_dot_mxfp4_portable, dequant_row_mxfp4_portable = _row_dot_mxfp4_ir(_decode_arithmetic), \
    _dequant_row_mxfp4_ir(_decode_arithmetic)


# --- Q8_0 -----------------------------------------------------------------------------------------------------------
def _row_dot_q8_0_ir(f16):
    @intrinsic
    def row_dot(typingctx, row, x, n_blocks):
        sig = types.float32(row, x, n_blocks)

        def codegen(context, builder, signature, args):
            wp, xp = _pointers(context, builder, signature, args)
            nb = args[2]
            acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16))
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                base = builder.mul(b, _const(builder, b, Q8_0_BLOCK_BYTES))
                _prefetch(builder, wp, base)
                d = f16(builder, builder.load(builder.bitcast(builder.gep(wp, [base]), _I16.as_pointer()), align=1))
                q0 = builder.sitofp(_load(builder, wp, builder.add(base, _const(builder, b, 2)), _V16I8, 1), _V16F)
                q1 = builder.sitofp(_load(builder, wp, builder.add(base, _const(builder, b, 18)), _V16I8, 1), _V16F)
                xoff = builder.mul(b, _const(builder, b, 32))
                x0 = _load(builder, xp, xoff, _V16F, 4)
                x1 = _load(builder, xp, builder.add(xoff, _const(builder, b, 16)), _V16F, 4)
                block = builder.fadd(builder.fmul(q0, x0, flags=_FAST), builder.fmul(q1, x1, flags=_FAST),
                                     flags=_FAST)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(block, _splat(builder, d, _V16F),
                                                                           flags=_FAST), flags=_FAST), acc)
            return _hsum(builder, builder.load(acc))

        return sig, codegen

    return row_dot


_row_dot_q8_0_native, row_dot_q8_0_portable = _row_dot_q8_0_ir(_f16_native), _row_dot_q8_0_ir(_f16_table)


@njit(cache=True, inline="always")
def _q8_0_scale(row, o):
    """The f16 scale that opens the block at byte o, as float32."""
    return F16_TO_F32[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@intrinsic
def _dequant_q8_split_vector(typingctx, values, scales, out):
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
def dequant_row_q8_0(row, out, n_blocks):
    for b in range(n_blocks):
        o = b * Q8_0_BLOCK_BYTES
        d = _q8_0_scale(row, o)
        for j in range(Q8_0_BLOCK_SIZE):
            out[b * Q8_0_BLOCK_SIZE + j] = np.float32(np.int8(row[o + 2 + j])) * d


# --- BF16 / F16 -----------------------------------------------------------------------------------------------------
def _row_dot_16bit(widen):
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
                w = widen(builder, bits)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(w, _load(builder, xp, i, _V16F, 4),
                                                                           flags=_FAST), flags=_FAST), acc)
            return _hsum(builder, builder.load(acc))

        return sig, codegen

    return row_dot


def _dequant_f16_ir(f16):
    @intrinsic
    def dequant_chunks(typingctx, row, out, n_chunks):
        """out[:16·n_chunks] = the 16-bit patterns row[:16·n_chunks] as float32 (`f16`: f16 or bf16 widening)."""
        sig = types.void(row, out, n_chunks)

        def codegen(context, builder, signature, args):
            wp, op = _pointers(context, builder, signature, args)
            v16i16 = ir.VectorType(_I16, 16)
            with cgutils.for_range(builder, args[2]) as loop:
                i = builder.mul(loop.index, _const(builder, loop.index, 16))
                bits = builder.load(builder.bitcast(builder.gep(builder.bitcast(wp, _I16.as_pointer()), [i]),
                                                    v16i16.as_pointer()), align=2)
                builder.store(f16(builder, bits), builder.bitcast(builder.gep(op, [i]), _V16F.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dequant_chunks


_row_dot_bf16_chunks = _row_dot_16bit(_bf16_widen)
_row_dot_f16_chunks_native, _row_dot_f16_chunks_integer = _row_dot_16bit(_f16_native), _row_dot_16bit(_f16_integer)
_dequant_f16_chunks_native, _dequant_f16_chunks_integer = _dequant_f16_ir(_f16_native), _dequant_f16_ir(_f16_integer)
_dequant_bf16_chunks = _dequant_f16_ir(_bf16_widen)


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


# --- exp ------------------------------------------------------------------------------------------------------------
@intrinsic
def _f32_of_bits(typingctx, bits):
    """An integer's low 32 bits as a float32."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, _I32)
        return builder.bitcast(value, _F32)

    return sig, codegen


@njit(cache=True, fastmath=FASTMATH, inline="always")
def exp_nonpositive(x):
    """exp(x) of a float32 x <= 0 (below -87: exp(-87); NaN stays NaN) in plain arithmetic, so that a loop of them
    vectorizes, where a libm call a value does not: softmax weights. Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2,
    exp(r) by a degree-7 polynomial, 2^n from its bits; relative error about 2e-7."""
    x = np.float32(-87.0) if x < np.float32(-87.0) else x
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_of_bits((np.int32(n) + np.int32(127)) << np.int32(23))


# --- attention tiles -------------------------------------------------------------------------------------------------
# Attention works on tiles of TILE_POSITIONS keys, held transposed (KT [d, TILE_POSITIONS]: a key a column), so a
# query row's scores are vectors along the positions and no score needs a sum across lanes.
TILE_POSITIONS = 64


def _array_pointer(context, builder, typ, value):
    array = context.make_array(typ)(context, builder, value)
    return builder.bitcast(array.data, _F32.as_pointer()), array


def _as_i64(context, builder, typ, value):
    return context.cast(builder, value, typ, types.int64)


def _transpose16(builder, rows):
    """The 16 × 16 transpose of 16 vectors of 16: four rounds of interleaving row i with row i + 8 (a perfect
    shuffle of the element indices' bits each round)."""
    low = ir.Constant(ir.VectorType(_I32, 16), [x for k in range(8) for x in (k, 16 + k)])
    high = ir.Constant(ir.VectorType(_I32, 16), [x for k in range(8, 16) for x in (k, 16 + k)])
    for _ in range(4):
        rows = [builder.shuffle_vector(rows[i // 2], rows[i // 2 + 8], high if i % 2 else low) for i in range(16)]
    return rows


@intrinsic
def tile_transpose(typingctx, K, n, KT):
    """KT[x, j] = K[j, x] for j < 16 · (n // 16) and x < 16 · (d // 16) (K [rows, d] float32 with rows of d
    contiguous values, KT [d, TILE_POSITIONS] C-contiguous): 16 × 16 blocks transposed in registers."""
    sig = types.void(K, n, KT)

    def codegen(context, builder, signature, args):
        k, k_array = _array_pointer(context, builder, signature.args[0], args[0])
        kt, _ = _array_pointer(context, builder, signature.args[2], args[2])
        n = _as_i64(context, builder, signature.args[1], args[1])
        d = builder.extract_value(k_array.shape, 1)
        with cgutils.for_range(builder, builder.sdiv(n, _i64(16))) as row_block:
            j = builder.mul(row_block.index, _i64(16))
            with cgutils.for_range(builder, builder.sdiv(d, _i64(16))) as column_block:
                x = builder.mul(column_block.index, _i64(16))
                rows = [_load(builder, k, builder.add(builder.mul(builder.add(j, _i64(i)), d), x), _V16F, 4)
                        for i in range(16)]
                for i, column in enumerate(_transpose16(builder, rows)):
                    at = builder.add(builder.mul(builder.add(x, _i64(i)), _i64(TILE_POSITIONS)), j)
                    builder.store(column, builder.bitcast(builder.gep(kt, [at]), _V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_scores(typingctx, Q, r0, r1, KT, S):
    """S[k, j] = Q[r_k] · KT[:, j] for k = 0, 1 and every j < TILE_POSITIONS (Q [rows, d], KT [d, TILE_POSITIONS],
    S [2, TILE_POSITIONS], C-contiguous float32). The eight vectors of sums stay in registers over the d steps;
    each step loads KT's row once for both query rows (r1 = r0 for a lone row)."""
    sig = types.void(Q, r0, r1, KT, S)

    def codegen(context, builder, signature, args):
        q, q_array = _array_pointer(context, builder, signature.args[0], args[0])
        kt, _ = _array_pointer(context, builder, signature.args[3], args[3])
        s, _ = _array_pointer(context, builder, signature.args[4], args[4])
        d = builder.extract_value(q_array.shape, 1)
        rows = [builder.mul(_as_i64(context, builder, signature.args[i], args[i]), d) for i in (1, 2)]
        vectors = TILE_POSITIONS // 16
        zero = ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16)
        sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(vectors)] for _ in rows]
        with cgutils.for_range(builder, d) as loop:
            x = loop.index
            qx = [_splat(builder, builder.load(builder.gep(q, [builder.add(row, x)])), _V16F) for row in rows]
            base = builder.mul(x, _i64(TILE_POSITIONS))
            for v in range(vectors):
                k = _load(builder, kt, builder.add(base, _i64(16 * v)), _V16F, 4)
                for i in range(len(rows)):
                    product = builder.fmul(qx[i], k, flags=_FAST)
                    builder.store(builder.fadd(builder.load(sums[i][v]), product, flags=_FAST), sums[i][v])
        for i in range(len(rows)):
            for v in range(vectors):
                at = builder.gep(s, [_i64(i * TILE_POSITIONS + 16 * v)])
                builder.store(builder.load(sums[i][v]), builder.bitcast(at, _V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_max(typingctx, scores, j0, j1, start):
    """The largest of `start` and scores[j0:j1] (float32), 16 lanes at a time: a loop of scalar maxima is one chain
    of dependent instructions, and LLVM does not vectorize it without assuming no NaNs."""
    sig = types.float32(scores, j0, j1, start)

    def codegen(context, builder, signature, args):
        sp, _ = _array_pointer(context, builder, signature.args[0], args[0])
        first, last = (_as_i64(context, builder, signature.args[i], args[i]) for i in (1, 2))
        larger = lambda a, b: builder.select(builder.fcmp_ordered(">", b, a), b, a)  # noqa: E731
        best = cgutils.alloca_once_value(builder, _splat(builder, args[3], _V16F))
        vectors = builder.sdiv(builder.sub(last, first), _i64(16))
        with cgutils.for_range(builder, vectors) as loop:
            v = _load(builder, sp, builder.add(first, builder.mul(loop.index, _i64(16))), _V16F, 4)
            builder.store(larger(builder.load(best), v), best)
        lanes = builder.load(best)
        total = cgutils.alloca_once_value(builder, builder.extract_element(lanes, ir.Constant(_I32, 0)))
        for i in range(1, 16):
            builder.store(larger(builder.load(total), builder.extract_element(lanes, ir.Constant(_I32, i))), total)
        tail = builder.add(first, builder.mul(vectors, _i64(16)))
        with cgutils.for_range(builder, builder.sub(last, tail)) as loop:
            value = builder.load(builder.gep(sp, [builder.add(tail, loop.index)]))
            builder.store(larger(builder.load(total), value), total)
        return builder.load(total)

    return sig, codegen


@intrinsic
def tile_values(typingctx, S, j0, j1, V, acc, r0, r1):
    """acc[r0, x] += Σ over j0 <= j < j1 of S[0, j] · V[j, x], and the same of S[1] into acc[r1] unless r1 < 0, for
    x < 16 · (d // 16) (S [2, TILE_POSITIONS], V [n, d], acc [rows, d], C-contiguous float32): 16 lanes of the rows
    at a time, each load of V feeding both rows, four positions' products in four sums a row (independent chains of
    adds), added to acc's rows once."""
    sig = types.void(S, j0, j1, V, acc, r0, r1)

    def codegen(context, builder, signature, args):
        s, _ = _array_pointer(context, builder, signature.args[0], args[0])
        v, v_array = _array_pointer(context, builder, signature.args[3], args[3])
        a, _ = _array_pointer(context, builder, signature.args[4], args[4])
        first, last, r0, r1 = (_as_i64(context, builder, signature.args[i], args[i]) for i in (1, 2, 5, 6))
        d = builder.extract_value(v_array.shape, 1)
        zero = ir.Constant(_V16F, [ir.Constant(_F32, 0.0)] * 16)
        quads = builder.sdiv(builder.sub(last, first), _i64(4))

        def add_products(sums, j, x, u):
            value = _load(builder, v, builder.add(builder.mul(j, d), x), _V16F, 4)
            for k, row_sums in enumerate(sums):
                weight = builder.load(builder.gep(s, [builder.add(j, _i64(k * TILE_POSITIONS))]))
                weight = _splat(builder, weight, _V16F)
                total = builder.fadd(builder.load(row_sums[u]), builder.fmul(weight, value, flags=_FAST), flags=_FAST)
                builder.store(total, row_sums[u])

        def rows_of(targets):
            with cgutils.for_range(builder, builder.sdiv(d, _i64(16))) as chunk:
                x = builder.mul(chunk.index, _i64(16))
                sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)] for _ in targets]
                with cgutils.for_range(builder, quads) as loop:
                    j = builder.add(first, builder.mul(loop.index, _i64(4)))
                    for u in range(4):
                        add_products(sums, builder.add(j, _i64(u)), x, u)
                rest = builder.sub(builder.sub(last, first), builder.mul(quads, _i64(4)))
                with cgutils.for_range(builder, rest) as loop:
                    add_products(sums, builder.add(builder.add(first, builder.mul(quads, _i64(4))), loop.index), x, 0)
                for row, row_sums in zip(targets, sums):
                    at = builder.bitcast(builder.gep(a, [builder.add(builder.mul(row, d), x)]), _V16F.as_pointer())
                    halves = [builder.fadd(builder.load(row_sums[u]), builder.load(row_sums[u + 1]), flags=_FAST)
                              for u in (0, 2)]
                    builder.store(builder.fadd(builder.load(at, align=4), builder.fadd(*halves, flags=_FAST),
                                               flags=_FAST), at, align=4)

        with builder.if_else(builder.icmp_signed(">=", r1, _i64(0))) as (two, one):
            with two:
                rows_of((r0, r1))
            with one:
                rows_of((r0,))
        return context.get_dummy_value()

    return sig, codegen


# --- the row functions, per instruction set -------------------------------------------------------------------------
# Vectors of 16 with a plain-loop tail for the 16-bit types; every other row is whole blocks.
@njit(cache=True, inline="always")
def row_dot_bf16(row, x):
    n = x.shape[0] // 16
    return _row_dot_bf16_chunks(row, x, n) + row_dot_16bit_scalar(row, BF16_TO_F32, x, n * 16)


@njit(cache=True, inline="always")
def dequant_row_bf16(row, out):
    n = out.shape[0] // 16
    _dequant_bf16_chunks(row, out, n)
    for i in range(n * 16, out.shape[0]):
        out[i] = BF16_TO_F32[row[i]]


@njit(cache=True, inline="always")
def dequant_row_q8_split(values, scales, out):
    """A row of the KV cache's q8_0: int8 values, their float32 scales (one per 32) in a separate row."""
    _dequant_q8_split_vector(values, scales, out)


@njit(cache=True, inline="always")
def _row_dot_f16_native(row, x):
    n = x.shape[0] // 16
    return _row_dot_f16_chunks_native(row, x, n) + row_dot_16bit_scalar(row, F16_TO_F32, x, n * 16)


@njit(cache=True, inline="always")
def row_dot_f16_portable(row, x):
    n = x.shape[0] // 16
    return _row_dot_f16_chunks_integer(row, x, n) + row_dot_16bit_scalar(row, F16_TO_F32, x, n * 16)


@njit(cache=True, inline="always")
def _dequant_row_f16_native(row, out):
    n = out.shape[0] // 16
    _dequant_f16_chunks_native(row, out, n)
    dequant_row_f16_scalar(row, out, n * 16)


@njit(cache=True, inline="always")
def dequant_row_f16_portable(row, out):
    n = out.shape[0] // 16
    _dequant_f16_chunks_integer(row, out, n)
    dequant_row_f16_scalar(row, out, n * 16)


if ISA == "x86":
    row_dot_mxfp4, dequant_row_mxfp4 = _row_dot_mxfp4_pshufb, _dequant_row_mxfp4_pshufb
elif ISA == "aarch64":
    row_dot_mxfp4, dequant_row_mxfp4 = _row_dot_mxfp4_tbl, _dequant_row_mxfp4_tbl
else:
    row_dot_mxfp4, dequant_row_mxfp4 = row_dot_mxfp4_portable, dequant_row_mxfp4_portable
if ISA == "portable":
    row_dot_q8_0, row_dot_f16, dequant_row_f16 = row_dot_q8_0_portable, row_dot_f16_portable, dequant_row_f16_portable
else:
    row_dot_q8_0, row_dot_f16, dequant_row_f16 = _row_dot_q8_0_native, _row_dot_f16_native, _dequant_row_f16_native
if ISA == "x86":
    # x86's conversion of a block's scale (vpinsrw + vcvtph2ps) merges into a register LLVM also gives the
    # accumulator: each block then waits on the last one's FMA. The table's load has no such tie (1.5x at 1 thread).
    row_dot_q8_0 = row_dot_q8_0_portable
