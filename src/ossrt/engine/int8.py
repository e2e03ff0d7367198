"""Matmuls with 8-bit activations on CPUs with VNNI's `vpdpbusd` (u8 × s8, four products summed into each int32
lane): about three times the multiply rate of float32 FMAs. Prefill's matmuls and MoE experts, and in decode the
MoE's experts and the Q8_0 matrices (attention projections, unembedding).

Activations are quantized per 32-value block, as llama.cpp's Q8_0 (scale = max |x| / 127, values rounded), and laid
out as a panel with 16 or 8 tokens side by side: for each block and each group of four values, one vector holds the
four int8 values of every token. Weight rows are decoded once each into unsigned bytes (MXFP4: E2M1 ×2 + 12, in
0..24; Q8_0: value + 128) with a float scale a block. Then one `vpdpbusd` takes four bytes of one weight row,
broadcast, against a panel vector, and adds four products into each token's lane: no transposes, no horizontal sums.
After a block's eight, the int32 lanes less the offset's share (offset × Σ of the token's block, computed with the
panel) become float32, scaled by weight scale × token scale, and are summed. Accumulation is float32 across blocks,
int32 within one, exactly.

A prompt's MoE experts each get a few tokens (a 60-token prompt: 7.5 of 240 to each of the 20b's 32 experts), too
few to fill a panel's lanes. There the lanes hold rows instead (`row_lanes_mxfp4`): a block of 16 rows is decoded
once into eight vectors, and each token's four bytes at a time, broadcast, meet them in one `vpdpbusd`, every lane
useful whatever the token count.

Decode multiplies one token's activations with each weight row once (`row_dot_mxfp4`, `row_dot_q8_0`): the token's
vector is quantized by the same rule, laid out to match the row's decoded bytes, and each row is decoded in
registers as it streams past, several blocks side by side in one vector with a scale a lane, so that no step sums
across lanes. On a VNNI CPU the float32 row dots are bound by their arithmetic, not by memory: the integer MoE runs
at 1.4-2.4× the float32 one's rate on the 20b, the Q8_0 unembedding at 1.2-1.3× and the attention output at
1.3-1.5× (`benchmarks/bench_int8.py --decode-only`, AMD EPYC, 2 threads); the fused q/k/v projections, near the
memory's rate either way, at 1.0-1.1×. The router, not Q8_0, stays float32.

All of it runs with `CpuOps(int8_activations=True)` (the default). Which instructions exist is read once from the
CPU (`DOT4`).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..format import mxfp4
from .simd import (MXFP4_BLOCK_BYTES, Q8_0_BLOCK_BYTES, _f16_native, _load,
                   _mxfp4_block, _nibble_lookup, _prefetch, _prefetch_line, _splat)

BLOCK = 32  # values a scale covers, for activations as for both weight types
_GROUPS = BLOCK // 4  # groups of four values in a block: one vpdpbusd each

# Bytes of a weight decoded for vpdpbusd's unsigned operand are value + offset; the offset's share is taken back
# with the activation sums.
MXFP4_OFFSET, Q8_0_OFFSET = 12, 128


def _cpu_features() -> dict:
    """What Numba compiles for: the host CPU unless NUMBA_CPU_NAME names another."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        flags = numba.config.CPU_FEATURES or ""
        return {f[1:]: f[0] == "+" for f in flags.split(",") if f}
    features = llvm_binding.get_host_cpu_features()
    return {name: features[name] for name in features}


def _dot4_kind() -> str | None:
    f = _cpu_features()
    if f.get("avx512vnni") and f.get("avx512vl") and f.get("avx512bw"):
        return "avx512vnni"
    if f.get("avxvnni"):
        return "avxvnni"
    return None


# "avx512vnni" (tokens 16 or 8 to a vector), "avxvnni" (8) or None: no int8 path, float32 everywhere.
DOT4 = _dot4_kind()
# AVX-512 VBMI's byte permutes (Ice Lake, Zen 4 on; not Skylake-X or Cascade Lake): an MXFP4 step's code bytes in one.
VBMI = DOT4 == "avx512vnni" and bool(_cpu_features().get("avx512vbmi"))

_F32_MAX = np.finfo(np.float32).max
_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16I8 = ir.VectorType(_I8, 16)
_FAST = ("fast",)


# --- activations ----------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _block_scale(x, start):
    """The scale of the 32 values from x[start]: max |x| / 127 (0 for a block of zeros), NaN if one is inf or NaN
    (max() passes over those), so that the products the block enters are NaN, as in float32. Values are then
    rounded from x / scale where the scale is above 0 (127 / max would overflow for denormal blocks)."""
    amax = np.float32(0.0)
    finite = True
    for j in range(BLOCK):
        amax = max(amax, abs(x[start + j]))
        finite &= abs(x[start + j]) <= _F32_MAX
    return amax / np.float32(127.0) if finite else np.float32(np.nan)


@njit(parallel=True, cache=True)
def _quantize_panel(X, lanes, offset, panel, scales, corrections):
    """X [T, H] → panel [groups, blocks, 8, lanes, 4] int8, scales and corrections [groups, blocks, lanes] (tokens
    past T: zeros). corrections = -offset · Σ of the block's int8 values. A block holding inf or NaN gets a NaN
    scale, so the products it enters are NaN, as in float32."""
    T, H = X.shape
    n_blocks = H // BLOCK
    for gb in prange(panel.shape[0] * n_blocks):
        group, b = gb // n_blocks, gb % n_blocks
        for lane in range(lanes):
            t = group * lanes + lane
            if t >= T:
                panel[group, b, :, lane, :] = 0
                scales[group, b, lane] = 0.0
                corrections[group, b, lane] = 0
                continue
            x = X[t, b * BLOCK:(b + 1) * BLOCK]
            d = _block_scale(x, 0)
            total = 0
            if d > 0:
                for j in range(BLOCK):
                    v = np.int8(np.rint(x[j] / d))
                    panel[group, b, j // 4, lane, j % 4] = v
                    total += v
            else:
                panel[group, b, :, lane, :] = 0
            scales[group, b, lane] = d
            corrections[group, b, lane] = -offset * total


def quantize_panel(X: np.ndarray, lanes: int, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X float32 [T, H] (H whole blocks) as the kernels' panel, scales and corrections for weights whose bytes
    carry `offset`."""
    groups = -(-X.shape[0] // lanes)
    n_blocks = X.shape[1] // BLOCK
    panel = np.empty((groups, n_blocks, _GROUPS, lanes, 4), dtype=np.int8)
    scales = np.empty((groups, n_blocks, lanes), dtype=np.float32)
    corrections = np.empty((groups, n_blocks, lanes), dtype=np.int32)
    _quantize_panel(X, lanes, offset, panel, scales, corrections)
    return panel, scales, corrections


# --- weight rows → unsigned bytes and block scales ------------------------------------------------------------------
def _i64(builder, value):
    return builder.sext(value, _I64) if value.type.width < 64 else value


def _dot4(builder, lanes: int):
    vi32 = ir.VectorType(_I32, lanes)
    name = {4: "llvm.x86.avx512.vpdpbusd.128", 8: "llvm.x86.avx512.vpdpbusd.256",
            16: "llvm.x86.avx512.vpdpbusd.512"}[lanes]
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi32, [vi32, vi32, vi32]), name)


def _vector_pointers(builder, arrays):
    """Pointers to the values, scales and corrections in a quantized vector's arrays."""
    return (builder.bitcast(arrays[0].data, _I8.as_pointer()), builder.bitcast(arrays[1].data, _F32.as_pointer()),
            builder.bitcast(arrays[2].data, _I32.as_pointer()))


def _lines_per_block(builder, lines, n_blocks):
    """Cache lines to prefetch a block for `lines` over n_blocks blocks (rounded up; one division, before the
    loop: a division a block cost more than the prefetches)."""
    return builder.udiv(builder.add(lines, builder.sub(n_blocks, ir.Constant(_I64, 1))), n_blocks)


def _prefetch_share(builder, ahead_p, lines, per_block, b) -> None:
    """Block b's share of the `lines` cache lines from ahead_p into L2: lines b · per_block on, as many as remain."""
    first = builder.mul(b, per_block)
    end = builder.add(first, per_block)
    end = builder.select(builder.icmp_unsigned("<", end, lines), end, lines)
    count = builder.select(builder.icmp_unsigned("<", first, end), builder.sub(end, first), ir.Constant(_I64, 0))
    with cgutils.for_range(builder, count) as line:
        at = builder.mul(builder.add(first, line.index), ir.Constant(_I64, 64))
        _prefetch_line(builder, builder.gep(ahead_p, [at]), locality=2)


def _row_pointers(context, builder, signature, args):
    arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:3], args[:3])]
    return (builder.bitcast(arrays[0].data, _I8.as_pointer()), builder.bitcast(arrays[1].data, _I8.as_pointer()),
            builder.bitcast(arrays[2].data, _F32.as_pointer()))


_BYTE_LOOKUP = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}


def _offset_bytes(builder, codes):
    """MXFP4 code bytes (a vector of 16, 32 or 64) → their values as vpdpbusd's unsigned bytes, E2M1 ×2 +
    MXFP4_OFFSET: those of the low nibbles and those of the high nibbles, two vectors as wide."""
    return _nibble_lookup(builder, codes, _BYTE_LOOKUP[codes.type.count],
                          mxfp4.KVALUES.astype(np.int32) + MXFP4_OFFSET)


# MXFP4 rows lanes / 4 blocks at a time (a step): their low-nibble and high-nibble values decoded by one table
# lookup each into two vectors of 4 · lanes bytes, block k's in bytes 16k to 16k + 15 of both, its scale in lanes 4k
# to 4k + 3 of a float vector. Decode's row dots multiply them as they are; the prefill's row decoder stores them.
MXFP4_BLOCK_LANES, Q8_0_BLOCK_LANES = 4, 8


def _mxfp4_row_steps(lanes: int, exponents: bool = False):
    """`_decode_row_dot`'s arguments for MXFP4 rows (lanes, blocks a step, step, tail block): a step's two
    vectors of byte values + MXFP4_OFFSET as `lanes` int32 each, and its per-lane scales (with `exponents`, the
    scales' exponents e - 128 as floats, for vscalefps); a block's 32 byte values + MXFP4_OFFSET and its scale."""
    per_step = lanes // MXFP4_BLOCK_LANES
    vi32 = ir.VectorType(_I32, lanes)

    def step(builder, c, wp, b0):
        start = builder.mul(b0, c(MXFP4_BLOCK_BYTES))
        _prefetch(builder, wp, start)  # a step is about one cache line
        if VBMI:
            # The step's first and last 4 · lanes bytes, and one two-source byte permute (vpermt2b) picks the
            # blocks' code bytes out of them.
            n, tail = 4 * lanes, MXFP4_BLOCK_BYTES * per_step - 4 * lanes
            first, last = (_load(builder, wp, builder.add(start, c(at)), ir.VectorType(_I8, n), 1) for at in (0, tail))
            picks = [MXFP4_BLOCK_BYTES * k + 1 + j for k in range(per_step) for j in range(16)]
            codes = builder.shuffle_vector(first, last, ir.Constant(ir.VectorType(_I32, n),
                                                                    [p if p < n else n + p - tail for p in picks]))
            low, high = _offset_bytes_vbmi(builder, codes)
        else:
            pieces = [_load(builder, wp, builder.add(start, c(MXFP4_BLOCK_BYTES * k + 1)), _V16I8, 1)
                      for k in range(per_step)]
            while len(pieces) > 1:  # the blocks' 16 code bytes side by side
                width = 2 * pieces[0].type.count
                pieces = [builder.shuffle_vector(pieces[i], pieces[i + 1],
                                                 ir.Constant(ir.VectorType(_I32, width), list(range(width))))
                          for i in range(0, len(pieces), 2)]
            codes = pieces[0]
            low, high = _offset_bytes(builder, codes)
        scales = (_step_exponents if exponents else _step_scales)(builder, wp, start, lanes)
        return [builder.bitcast(low, vi32), builder.bitcast(high, vi32)], scales

    def tail_block(builder, c, wp, b):
        w_scale, lo, hi = _mxfp4_block(builder, wp, b, _offset_bytes)
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32)))), w_scale

    return lanes, per_step, step, tail_block


def _offset_bytes_vbmi(builder, codes):
    """`_offset_bytes` by AVX-512 VBMI's vpermb, which reads only an index's low 6 bits: with the 16 values
    repeated over the 64-byte table, the low nibbles need no mask and the high ones a 16-bit shift only (the bits
    it brings in from the next byte are bits 4-5, ignored as well). Three operations where pshufb took five."""
    n = codes.type.count
    vi8, vi16 = ir.VectorType(_I8, n), ir.VectorType(ir.IntType(16), n // 2)
    name = {32: "llvm.x86.avx512.permvar.qi.256", 64: "llvm.x86.avx512.permvar.qi.512"}[n]
    permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi8, [vi8, vi8]), name)
    values = mxfp4.KVALUES.astype(np.int32) + MXFP4_OFFSET
    table = ir.Constant(vi8, [ir.Constant(_I8, int(v)) for v in np.tile(values, n // 16)])
    shifted = builder.bitcast(builder.lshr(builder.bitcast(codes, vi16),
                                           ir.Constant(vi16, [ir.Constant(vi16.element, 4)] * (n // 2))), vi8)
    return builder.call(permute, [table, codes]), builder.call(permute, [table, shifted])


def _step_exponents(builder, wp, start, lanes: int):
    """The exponents e - 128 of the scales of the lanes / 4 MXFP4 blocks from byte `start`, as floats, block k's
    in lanes 4k to 4k + 3 (`_step_scales`'s bytes): each byte e under the bits of 2^23 is the float 2^23 + e,
    exactly, so one subtraction makes it e - 128."""
    n = 4 * lanes
    vi8 = ir.VectorType(_I8, n)
    # Lane bytes 0-3: the block's scale byte, 0, 0, 0x4B (the high byte of 2^23's bits), the last two from a
    # constant whose byte 0 is 0x4B and the rest zeros.
    constant = ir.Constant(vi8, [ir.Constant(_I8, 0x4B if i == 0 else 0) for i in range(n)])
    picks = [(i // 16) * MXFP4_BLOCK_BYTES if i % 4 == 0 else n if i % 4 == 3 else n + 1 for i in range(n)]
    bits = builder.shuffle_vector(_load(builder, wp, start, vi8, 1), constant, ir.Constant(ir.VectorType(_I32, n), picks))
    floats = builder.bitcast(bits, ir.VectorType(_F32, lanes))
    return builder.fsub(floats, ir.Constant(floats.type, [ir.Constant(_F32, 2.0 ** 23 + 128)] * lanes))


def _step_scales(builder, wp, start, lanes: int):
    """The scales 2^(e-128) of the lanes / 4 MXFP4 blocks from byte `start` (17 bytes each), block k's in lanes 4k
    to 4k + 3: float32 [lanes]. Block k's scale byte lies at 17k = 16k + k, byte k of the step's k-th 16 bytes, so
    one in-lane byte shuffle of the step's first 4 · lanes bytes puts every block's byte in its lanes (where a
    load, a table load and an insert a block took 13 operations for four blocks)."""
    n = 4 * lanes
    vi8, vi32 = ir.VectorType(_I8, n), ir.VectorType(_I32, lanes)
    shuffle = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi8, [vi8, vi8]), _BYTE_LOOKUP[n])
    index = ir.Constant(vi8, [ir.Constant(_I8, (i // 16) if i % 4 == 0 else -128) for i in range(n)])
    return _e8m0_scales(builder, builder.bitcast(builder.call(shuffle, [_load(builder, wp, start, vi8, 1), index]),
                                                 vi32))


def _e8m0_scales(builder, e):
    """MXFP4 scale bytes e (int32 vector, 0..255) → float32 2^(e - 128) from the bits: (e - 1) << 23, or for e = 0
    and 1 the subnormals 2^-128 and 2^-127 (0x200000 << e)."""
    ci = lambda v: ir.Constant(e.type, [ir.Constant(_I32, v)] * e.type.count)  # noqa: E731
    bits = builder.select(builder.icmp_unsigned(">=", e, ci(2)), builder.shl(builder.sub(e, ci(1)), ci(23)),
                          builder.shl(ci(0x200000), e))
    return builder.bitcast(bits, ir.VectorType(_F32, e.type.count))


def _decode_row_mxfp4_u8_of(lanes: int):
    """An intrinsic decode(row, out, scales, n_blocks): out[32b + j] = E2M1 value ×2 + 12 of element j of block b
    (j < 16: low nibbles, else high), scales[b] = the block's 2^(e-128); whole steps of `lanes` / 4 blocks
    (`_mxfp4_row_steps`), then the blocks past them one at a time."""
    _, per_step, step, _ = _mxfp4_row_steps(lanes)
    nbytes = 4 * lanes
    # Each block's 16 low-nibble values, then its 16 high-nibble ones (the second vector's bytes from nbytes on).
    order = [base + 16 * k + j for k in range(per_step) for base in (0, nbytes) for j in range(16)]

    @intrinsic
    def decode(typingctx, row, out, scales, n_blocks):
        sig = types.void(row, out, scales, n_blocks)

        def codegen(context, builder, signature, args):
            wp, op, sp = _row_pointers(context, builder, signature, args)
            c = lambda v: ir.Constant(_I64, v)  # noqa: E731
            n_blocks = _i64(builder, args[3])
            steps = builder.udiv(n_blocks, c(per_step))
            vi8 = ir.VectorType(_I8, nbytes)
            with cgutils.for_range(builder, steps) as loop:
                s = loop.index
                (low, high), w_scale = step(builder, c, wp, builder.mul(s, c(per_step)))
                values = builder.shuffle_vector(builder.bitcast(low, vi8), builder.bitcast(high, vi8),
                                                ir.Constant(ir.VectorType(_I32, 2 * nbytes), order))
                ptr = builder.gep(op, [builder.mul(s, c(per_step * BLOCK))])
                builder.store(values, builder.bitcast(ptr, values.type.as_pointer()), align=1)
                block_scales = builder.shuffle_vector(w_scale, w_scale, ir.Constant(
                    ir.VectorType(_I32, per_step), [MXFP4_BLOCK_LANES * k for k in range(per_step)]))
                ptr = builder.gep(sp, [builder.mul(s, c(per_step))])
                builder.store(block_scales, builder.bitcast(ptr, block_scales.type.as_pointer()), align=4)
            done = builder.mul(steps, c(per_step))
            with cgutils.for_range(builder, builder.sub(n_blocks, done)) as loop:
                b = builder.add(done, loop.index)
                scale, lo, hi = _mxfp4_block(builder, wp, b, _offset_bytes)
                builder.store(scale, builder.gep(sp, [b]))
                for half, values in ((0, lo), (16, hi)):
                    ptr = builder.gep(op, [builder.add(builder.mul(b, c(BLOCK)), c(half))])
                    builder.store(values, builder.bitcast(ptr, _V16I8.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return decode


_decode_row_mxfp4_u8 = _decode_row_mxfp4_u8_of(16 if DOT4 == "avx512vnni" else 8)


@intrinsic
def _decode_row_q8_0_u8(typingctx, row, out, scales, n_blocks):
    """out[32b + j] = int8 value j of block b + 128, scales[b] = its f16 scale."""
    sig = types.void(row, out, scales, n_blocks)

    def codegen(context, builder, signature, args):
        wp, op, sp = _row_pointers(context, builder, signature, args)
        v32i8 = ir.VectorType(_I8, 32)
        sign = ir.Constant(v32i8, [ir.Constant(_I8, 0x80)] * 32)
        with cgutils.for_range(builder, args[3]) as loop:
            b = loop.index
            base = builder.mul(b, ir.Constant(b.type, Q8_0_BLOCK_BYTES))
            _prefetch(builder, wp, base)
            bits = builder.load(builder.bitcast(builder.gep(wp, [base]), ir.IntType(16).as_pointer()), align=1)
            builder.store(_f16_native(builder, bits), builder.gep(sp, [b]))
            values = _load(builder, wp, builder.add(base, ir.Constant(b.type, 2)), v32i8, 1)
            ptr = builder.gep(op, [builder.mul(b, ir.Constant(b.type, BLOCK))])
            builder.store(builder.xor(values, sign), builder.bitcast(ptr, v32i8.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


# --- the kernel -----------------------------------------------------------------------------------------------------
# Weight rows a kernel call takes: enough independent vpdpbusd chains (rows × token groups) to hide its latency,
# few enough accumulators (two vectors a chain) for the registers.
ROWS_PAIR, ROWS_ONE = 4, 8
TASK_ROWS = 16  # rows a thread decodes at once (46 KB for the 20b)
TILE_GROUPS = 8  # token groups whose panel (368 KB for the 20b) stays in L2 while a task's rows pass over it


def _gemm(lanes: int, token_groups: int, rows: int, stride: int | None = None):
    """An intrinsic out[(g0 + i)·stride + lane, r0 + k] = Σ over blocks of row k of `wq` against token group g0 + i
    of the panel, for k < rows, i < token_groups, lane < lanes. wq [rows, H] uint8 and wd [rows, blocks] float32
    from the row decoders; panel, scales and corrections from quantize_panel, `stride` tokens to a group (default
    `lanes`; more: only a group's first `lanes` tokens are computed); out float32 [groups · stride, rows]. `ahead`
    (rows of packed weights) is prefetched along the way."""
    stride = stride or lanes
    vi32, vf32 = ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)

    @intrinsic
    def gemm(typingctx, wq, wd, panel, scales, corrections, out, r0, g0, ahead):
        sig = types.void(wq, wd, panel, scales, corrections, out, r0, g0, ahead)

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:6], args[:6])]
            wq_p = builder.bitcast(arrays[0].data, _I32.as_pointer())  # four bytes at a time
            wd_p = builder.bitcast(arrays[1].data, _F32.as_pointer())
            panel_p = builder.bitcast(arrays[2].data, _I32.as_pointer())
            scales_p = builder.bitcast(arrays[3].data, _F32.as_pointer())
            corr_p = builder.bitcast(arrays[4].data, _I32.as_pointer())
            out_p = builder.bitcast(arrays[5].data, _F32.as_pointer())
            n_blocks = builder.extract_value(arrays[1].shape, 1)
            width = builder.extract_value(arrays[5].shape, 1)  # out's row length: rows of weights
            r0, g0 = (_i64(builder, a) for a in args[6:8])
            c = lambda v: ir.Constant(_I64, v)  # noqa: E731
            ahead = context.make_array(signature.args[8])(context, builder, args[8])
            ahead_p = builder.bitcast(ahead.data, _I8.as_pointer())
            ahead_lines = builder.udiv(builder.mul(*(builder.extract_value(ahead.shape, i) for i in (0, 1))), c(64))
            per_block = _lines_per_block(builder, ahead_lines, n_blocks)
            dot4 = _dot4(builder, lanes)
            zero = ir.Constant(vf32, [ir.Constant(_F32, 0.0)] * lanes)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(token_groups)] for _ in range(rows)]
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                # A share of `ahead` a block, into L2: the rows decoded next arrive while these multiply.
                _prefetch_share(builder, ahead_p, ahead_lines, per_block, b)
                # Token group g0 + i's vectors of block b start at element ((g0 + i)·blocks + b)·stride.
                starts = [builder.mul(builder.add(builder.mul(builder.add(g0, c(i)), n_blocks), b), c(stride))
                          for i in range(token_groups)]
                x_scale = [_load(builder, scales_p, s, vf32, 4) for s in starts]
                corrections_b = [_load(builder, corr_p, s, vi32, 4) for s in starts]
                sums = [list(corrections_b) for _ in range(rows)]  # each row's int32 sums start from them
                for g in range(_GROUPS):
                    xs = [_load(builder, panel_p, builder.add(builder.mul(s, c(_GROUPS)), c(g * stride)), vi32, 4)
                          for s in starts]
                    for k in range(rows):
                        w4 = builder.load(builder.gep(wq_p, [builder.add(builder.mul(n_blocks, c(k * _GROUPS)),
                                                                         builder.add(builder.mul(b, c(_GROUPS)),
                                                                                     c(g)))]), align=1)
                        w = _splat(builder, w4, vi32)
                        for i in range(token_groups):
                            sums[k][i] = builder.call(dot4, [sums[k][i], w, xs[i]])
                for k in range(rows):
                    w_scale = _splat(builder, builder.load(builder.gep(wd_p, [builder.add(builder.mul(n_blocks, c(k)),
                                                                                          b)])), vf32)
                    for i in range(token_groups):
                        scale = builder.fmul(w_scale, x_scale[i])
                        total = builder.fadd(builder.load(acc[k][i]),
                                             builder.fmul(builder.sitofp(sums[k][i], vf32), scale, flags=("fast",)),
                                             flags=("fast",))
                        builder.store(total, acc[k][i])
            # out is [tokens, rows]: each lane is one token's value of row k, stored in its own row of out (once a
            # call, a vector store and a transpose would cost more).
            for k in range(rows):
                for i in range(token_groups):
                    sums_k = builder.load(acc[k][i])
                    first = builder.add(builder.mul(builder.mul(builder.add(g0, c(i)), c(stride)), width),
                                        builder.add(r0, c(k)))
                    for lane in range(lanes):
                        builder.store(builder.extract_element(sums_k, ir.Constant(_I32, lane)),
                                      builder.gep(out_p, [builder.add(first, builder.mul(c(lane), width))]))
            return context.get_dummy_value()

        return sig, codegen

    return gemm


# Without AVX-512 the 16-lane names stand for the 8-lane kernels (never called with 16 lanes: `lanes_for`), so the
# driver compiles on every VNNI CPU. The half kernels take the first half of a group: the last group when it holds
# no more tokens than that.
_gemm8_pair, _gemm8_one, _gemm8_half = _gemm(8, 2, ROWS_PAIR), _gemm(8, 1, ROWS_ONE), _gemm(4, 1, ROWS_ONE, 8)
_gemm16_pair, _gemm16_one, _gemm16_half = \
    (_gemm(16, 2, ROWS_PAIR), _gemm(16, 1, ROWS_ONE), _gemm(8, 1, ROWS_ONE, 16)) if DOT4 == "avx512vnni" else \
    (_gemm8_pair, _gemm8_one, _gemm8_half)
PAIR, ONE, HALF = 0, 1, 2


@njit(cache=True, inline="always")
def _gemm_call(kind, wq, wd, panel, scales, corrections, out, r0, g, ahead):
    """The kernel for the panel's width over token groups g and g + 1 (PAIR), g (ONE) or g's first half (HALF)."""
    wide = panel.shape[3] == 16
    if kind == PAIR and wide:
        _gemm16_pair(wq, wd, panel, scales, corrections, out, r0, g, ahead)
    elif kind == PAIR:
        _gemm8_pair(wq, wd, panel, scales, corrections, out, r0, g, ahead)
    elif kind == ONE and wide:
        _gemm16_one(wq, wd, panel, scales, corrections, out, r0, g, ahead)
    elif kind == ONE:
        _gemm8_one(wq, wd, panel, scales, corrections, out, r0, g, ahead)
    elif wide:
        _gemm16_half(wq, wd, panel, scales, corrections, out, r0, g, ahead)
    else:
        _gemm8_half(wq, wd, panel, scales, corrections, out, r0, g, ahead)


@njit(parallel=True, cache=True)
def _matmul_panel(w, mxfp4_rows, panel, scales, corrections, n_tokens, out, threads):
    """Packed weights w [R, bytes] (MXFP4 rows if `mxfp4_rows`, else Q8_0) against a panel of n_tokens tokens: out
    [groups · lanes, R rounded up to TASK_ROWS]. The work is split in tasks of TASK_ROWS rows: a task decodes its
    rows once, then multiplies them with the token groups, two at a time, a few rows at a time (the panel is read
    from cache). One function for every weight type and width, not a factory of closures, which Numba's cache
    cannot tell apart. `threads`: Numba's thread count (read in Python: reading it here would keep the function
    from the cache)."""
    R = w.shape[0]
    n_blocks = panel.shape[1]
    lanes = panel.shape[3]
    n_tasks = out.shape[1] // TASK_ROWS
    groups = -(-n_tokens // lanes)
    # A last group with no more tokens than half a vector takes the half-width kernel.
    full = groups - (n_tokens - (groups - 1) * lanes <= lanes // 2)
    for thread in prange(threads):
        wq = np.zeros((TASK_ROWS, n_blocks * BLOCK), dtype=np.uint8)
        wd = np.zeros((TASK_ROWS, n_blocks), dtype=np.float32)
        nothing = w[:0]
        for task in range(thread * n_tasks // threads, (thread + 1) * n_tasks // threads):
            r0 = task * TASK_ROWS
            for k in range(min(TASK_ROWS, R - r0)):
                if mxfp4_rows:
                    _decode_row_mxfp4_u8(w[r0 + k], wq[k], wd[k], n_blocks)
                else:
                    _decode_row_q8_0_u8(w[r0 + k], wq[k], wd[k], n_blocks)
            # The first pass over the rows fetches the next task's (the rows this thread decodes next).
            r_next = r0 + TASK_ROWS
            for tile in range(0, full, TILE_GROUPS):
                end = min(tile + TILE_GROUPS, full)
                for k in range(0, TASK_ROWS, ROWS_PAIR):
                    for g in range(tile, end - 1, 2):
                        ahead = w[r_next + k:r_next + k + ROWS_PAIR] if g == 0 else nothing
                        _gemm_call(PAIR, wq[k:k + ROWS_PAIR], wd[k:k + ROWS_PAIR], panel, scales, corrections, out,
                                   r0 + k, g, ahead)
                if (end - tile) % 2:
                    for k in range(0, TASK_ROWS, ROWS_ONE):
                        ahead = w[r_next + k:r_next + k + ROWS_ONE] if full == 1 else nothing
                        _gemm_call(ONE, wq[k:k + ROWS_ONE], wd[k:k + ROWS_ONE], panel, scales, corrections, out,
                                   r0 + k, end - 1, ahead)
            if full < groups:
                for k in range(0, TASK_ROWS, ROWS_ONE):
                    ahead = w[r_next + k:r_next + k + ROWS_ONE] if full == 0 else nothing
                    _gemm_call(HALF, wq[k:k + ROWS_ONE], wd[k:k + ROWS_ONE], panel, scales, corrections, out,
                               r0 + k, full, ahead)


# --- a few tokens against MXFP4 rows: rows in the lanes -------------------------------------------------------------
# An expert given a few tokens of a prompt: a panel would be mostly padding lanes, and row dots repeat their scale
# arithmetic for each token. Here a vector holds one token's sums for `lanes` rows: each block of those rows is
# decoded once (one row's four code dwords to each lane, a table lookup per nibble half), then for every token one
# `vpdpbusd` per four values takes the token's four bytes broadcast from memory, all lanes useful. Outputs are
# accumulated in place, block by block, as the panel kernel does.
# fastmath=False said outright: a callee compiled for a fastmath caller inherits the flag unless it sets it, and
# x / d could become x · (1 / d), off the rule.
@njit(cache=True, fastmath=False)
def quantize_row(x, offset, xq, xs, xc):
    """x float32 [32·n_blocks] → xq int8 (same order), xs float32 and xc int32 [n_blocks]: a block's scale and
    its correction -offset · Σ values, by the panels' rule (a block holding inf or NaN gets a NaN scale)."""
    for b in range(x.shape[0] // BLOCK):
        d = _block_scale(x, b * BLOCK)
        total = 0
        for j in range(BLOCK):
            v = np.int8(np.rint(x[b * BLOCK + j] / d)) if d > 0 else np.int8(0)
            xq[b * BLOCK + j] = v
            total += v
        xs[b] = d
        xc[b] = -offset * total


def _code_dwords(builder, rows, at, lanes: int):
    """The 16 code bytes at byte `at` of each of `lanes` rows as four vectors of int32 [lanes]: vector d holds
    dword d of row k in lane k. Vector m of the loads holds rows m, m + 4, m + 8, ... in its 16-byte lanes, so that
    a 4 × 4 dword transpose within each 16-byte lane (two rounds of unpacks) leaves row 4L + m, in lane 4L + m."""
    v4i32 = ir.VectorType(_I32, 4)
    loaded = [builder.bitcast(_load(builder, row, at, _V16I8, 1), v4i32) for row in rows]
    joined = []
    for m in range(4):
        parts = loaded[m::4]
        while len(parts) > 1:
            n = 2 * parts[0].type.count
            parts = [builder.shuffle_vector(parts[i], parts[i + 1], ir.Constant(ir.VectorType(_I32, n), list(range(n))))
                     for i in range(0, len(parts), 2)]
        joined.append(parts[0])

    def within_lanes(a, b, picks):  # per 16-byte lane: picks 0-3 from a's dwords, 4-7 from b's
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, lanes), [
            4 * L + p if p < 4 else lanes + 4 * L + p - 4 for L in range(lanes // 4) for p in picks]))

    low01, high01 = within_lanes(joined[0], joined[1], [0, 4, 1, 5]), within_lanes(joined[0], joined[1], [2, 6, 3, 7])
    low23, high23 = within_lanes(joined[2], joined[3], [0, 4, 1, 5]), within_lanes(joined[2], joined[3], [2, 6, 3, 7])
    return [within_lanes(low01, low23, [0, 1, 4, 5]), within_lanes(low01, low23, [2, 3, 6, 7]),
            within_lanes(high01, high23, [0, 1, 4, 5]), within_lanes(high01, high23, [2, 3, 6, 7])]


def _row_lanes_gemm(lanes: int):
    """An intrinsic gemm(w, r0, xq, xs, xc, vectors, first, count, out): out[first + i, r0 + k] = row r0 + k of the
    MXFP4 matrix w [R, bytes] · the vector in row vectors[first + i] of xq, xs, xc (quantize_row with
    MXFP4_OFFSET), for i < count and k < lanes (rows past R: any numbers; out needs r0 + lanes columns)."""
    nbytes = 4 * lanes
    vi32, vf32, vi8 = ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes), ir.VectorType(_I8, nbytes)

    @intrinsic
    def gemm(typingctx, w, r0, xq, xs, xc, vectors, first, count, out):
        sig = types.void(w, r0, xq, xs, xc, vectors, first, count, out)

        def codegen(context, builder, signature, args):
            w_a, xq_a, xs_a, xc_a, index_a, out_a = (
                context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args)
                if isinstance(t, types.Array))
            c = lambda v: ir.Constant(_I64, v)  # noqa: E731
            wp = builder.bitcast(w_a.data, _I8.as_pointer())
            xq_p, xs_p, xc_p = _vector_pointers(builder, (xq_a, xs_a, xc_a))
            index_p = builder.bitcast(index_a.data, _I64.as_pointer())
            out_p = builder.bitcast(out_a.data, _F32.as_pointer())
            n_rows, row_bytes = (builder.extract_value(w_a.shape, i) for i in (0, 1))
            n_blocks, width = builder.extract_value(xs_a.shape, 1), builder.extract_value(out_a.shape, 1)
            x_len = builder.extract_value(xq_a.shape, 1)
            r0, first, count = (_i64(builder, args[i]) for i in (1, 6, 7))
            last = builder.sub(n_rows, c(1))
            rows = []
            for k in range(lanes):
                r = builder.add(r0, c(k))
                r = builder.select(builder.icmp_signed("<", r, last), r, last)
                rows.append(builder.gep(wp, [builder.mul(r, row_bytes)]))
            ahead = builder.gep(wp, [builder.mul(builder.add(r0, c(lanes)), row_bytes)])
            ahead_lines = builder.select(builder.icmp_signed("<", builder.add(r0, c(lanes)), n_rows),
                                         builder.udiv(builder.mul(c(lanes), row_bytes), c(64)), c(0))
            per_block = _lines_per_block(builder, ahead_lines, n_blocks)
            dot4 = _dot4(builder, lanes)
            zero = ir.Constant(vf32, [ir.Constant(_F32, 0.0)] * lanes)
            vi64, vptr = ir.VectorType(_I64, lanes), ir.VectorType(_I32.as_pointer(), lanes)
            ci = lambda v: ir.Constant(vi32, [ir.Constant(_I32, v)] * lanes)  # noqa: E731
            offsets = ir.Constant(vi64, ir.Undefined)
            for k, row in enumerate(rows):
                offsets = builder.insert_element(offsets, builder.sub(builder.ptrtoint(row, _I64),
                                                                      builder.ptrtoint(rows[0], _I64)),
                                                 ir.Constant(_I32, k))
            all_lanes = ir.Constant(ir.VectorType(ir.IntType(1), lanes), [ir.Constant(ir.IntType(1), 1)] * lanes)
            gather = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                vi32, [vptr, _I32, all_lanes.type, vi32]), f"llvm.masked.gather.v{lanes}i32.v{lanes}p0")

            def out_of(i):
                at = builder.add(builder.mul(builder.add(first, i), width), r0)
                return builder.bitcast(builder.gep(out_p, [at]), vf32.as_pointer())

            with cgutils.for_range(builder, count) as loop:
                builder.store(zero, out_of(loop.index), align=4)
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                at = builder.mul(b, c(MXFP4_BLOCK_BYTES))
                dwords = [builder.bitcast(v, vi8) for v in _code_dwords(builder, rows, builder.add(at, c(1)), lanes)]
                # Dword d holds values 4d..4d+3 in its low nibbles and 16 + 4d.. in its high ones: groups d, 4 + d.
                halves = [_offset_bytes(builder, v) for v in dwords]
                weights = [builder.bitcast(half[i], vi32) for i in (0, 1) for half in halves]
                # The rows' scale bytes in one gather.
                where = builder.add(_splat(builder, builder.ptrtoint(builder.gep(rows[0], [at]), _I64), vi64),
                                    offsets)
                e = builder.and_(builder.call(gather, [builder.inttoptr(where, vptr), ir.Constant(_I32, 1), all_lanes,
                                                       ir.Constant(vi32, ir.Undefined)]), ci(255))
                w_scale = _e8m0_scales(builder, e)
                # The tile's rows are one run of memory, read across; the next tile's run is fetched into L2 along
                # the way, a share a block.
                _prefetch_share(builder, ahead, ahead_lines, per_block, b)
                with cgutils.for_range(builder, count) as tokens:
                    v = builder.load(builder.gep(index_p, [builder.add(first, tokens.index)]))
                    slot = builder.add(builder.mul(v, n_blocks), b)
                    x_at = builder.add(builder.mul(v, x_len), builder.mul(b, c(BLOCK)))
                    x_p = builder.bitcast(builder.gep(xq_p, [x_at]), _I32.as_pointer())
                    # Two chains of four vpdpbusd, not one of eight: the token's sums wait half as long.
                    chains = [_splat(builder, builder.load(builder.gep(xc_p, [slot])), vi32), ci(0)]
                    for g, wv in enumerate(weights):
                        x4 = _splat(builder, builder.load(builder.gep(x_p, [c(g)]), align=1), vi32)
                        chains[g % 2] = builder.call(dot4, [chains[g % 2], wv, x4])
                    sums = builder.add(*chains)
                    scale = builder.fmul(w_scale, _splat(builder, builder.load(builder.gep(xs_p, [slot])), vf32))
                    o = out_of(tokens.index)
                    builder.store(builder.fadd(builder.load(o, align=4), builder.fmul(builder.sitofp(sums, vf32), scale,
                                                                                      flags=_FAST), flags=_FAST),
                                  o, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


_row_lanes8 = _row_lanes_gemm(8)
_row_lanes16 = _row_lanes_gemm(16) if DOT4 == "avx512vnni" else _row_lanes8


@njit(cache=True, inline="always")
def row_lanes_mxfp4(w, r0, xq, xs, xc, vectors, first, count, lanes, out):
    """out[first + i, r0 + k] = row r0 + k of the MXFP4 matrix w · the vector in row vectors[first + i] of xq, xs,
    xc (quantize_row with MXFP4_OFFSET), for i < count, k < lanes (decode_lanes()). The caller has checked shapes
    and indices; out needs r0 + lanes columns (those past w's rows get any numbers)."""
    if lanes == 16:
        _row_lanes16(w, r0, xq, xs, xc, vectors, first, count, out)
    else:
        _row_lanes8(w, r0, xq, xs, xc, vectors, first, count, out)


# --- decode: one activation vector against MXFP4 rows ---------------------------------------------------------------
# A row dot takes `lanes` (8 or 16) int32 lanes at a time: lanes / 4 blocks a step, their low-nibble values in one
# vector and their high-nibble values in another, each block's four lanes in both. The activation is laid out to
# match (`quantize_vector`), so a row's decoded bytes need no shuffling: per step, two vpdpbusd, one conversion and
# one multiply-add by the blocks' scales. With 16 lanes, two blocks past the last whole step take a half step of 8
# lanes (the 20b's rows are 90 blocks: 22 steps and a half; one at a time, with a sum across lanes each, those two
# cost a fifth of the row). Blocks past the steps go one at a time in the natural order.
# A Q8_0 row dot lays blocks side by side in the same way, each block's 32 values in 8 lanes in their natural order
# (a step of lanes / 8 blocks is 32 · lanes / 8 consecutive bytes of the vector): one vpdpbusd a step.


@njit(cache=True, inline="always")
def _steps(n_blocks, lanes, block_lanes):
    """How the row dots take n_blocks blocks: (whole steps of lanes / block_lanes blocks, blocks in a half step
    after them: lanes / block_lanes / 2 or 0). Only MXFP4 with 16 lanes has half steps (of two blocks)."""
    per_step = lanes // block_lanes
    steps = n_blocks // per_step
    half = per_step // 2 if per_step >= 4 and n_blocks - steps * per_step >= per_step // 2 else 0
    return steps, half


@njit(cache=True, inline="always")
def vector_slots(n_blocks, lanes, block_lanes):
    """Length of a quantized vector's scales and corrections: `lanes` a whole step, lanes / 2 for a half step, then
    one a block past them."""
    steps, half = _steps(n_blocks, lanes, block_lanes)
    return steps * lanes + half * block_lanes + n_blocks - steps * (lanes // block_lanes) - half


# fastmath=False said outright: a callee compiled for a fastmath caller inherits the flag unless it sets it, and
# x / d could become x · (1 / d), off the rule.
@njit(cache=True, fastmath=False)
def quantize_vector(x, lanes, offset, block_lanes, xq, xs, xc):
    """x float32 [32·n_blocks] → xq int8 [32·n_blocks], xs float32 and xc int32 [vector_slots] in the row dots'
    layout, `block_lanes` (MXFP4_BLOCK_LANES or Q8_0_BLOCK_LANES) int32 lanes to a block. Block b at place k of a
    step of L lanes (a whole step s of `lanes`, first block b0 = s·lanes/block_lanes, first slot s·lanes; or the
    half step after them, of lanes / 2): scale at xs[first slot + block_lanes·k ...] (block_lanes of them),
    correction -offset · Σ values at xc[first slot + block_lanes·k] and zeros in the step's other lanes; values,
    with 4 lanes a block, 0..15 at xq[32·b0 + 16k ...] and 16..31 at 4·L bytes further; with 8, at xq[32b ...].
    A block past the steps: values at xq[32b ...], scale and correction at the next slot. A block holding inf or
    NaN gets a NaN scale, as in the panels."""
    n_blocks = x.shape[0] // BLOCK
    per_step = lanes // block_lanes
    steps, half = _steps(n_blocks, lanes, block_lanes)
    stepped = steps * per_step + half  # blocks in whole or half steps
    xc[:steps * lanes + half * block_lanes] = 0
    for b in range(n_blocks):
        d = _block_scale(x, b * BLOCK)
        if b < steps * per_step:
            n_lanes, b0, slot = lanes, b - b % per_step, b // per_step * lanes
        else:
            n_lanes, b0, slot = lanes // 2, steps * per_step, steps * lanes
        k = b - b0
        total = 0
        for j in range(BLOCK):
            v = np.int8(np.rint(x[b * BLOCK + j] / d)) if d > 0 else np.int8(0)
            total += v
            if b < stepped and block_lanes == MXFP4_BLOCK_LANES:
                xq[b0 * BLOCK + (j // 16) * 4 * n_lanes + 16 * k + j % 16] = v
            else:
                xq[b * BLOCK + j] = v
        if b < stepped:
            xs[slot + block_lanes * k:slot + block_lanes * (k + 1)] = d
            xc[slot + block_lanes * k] = -offset * total
        else:
            slot = steps * lanes + half * block_lanes + b - stepped
            xs[slot] = d
            xc[slot] = -offset * total


def _add_block(builder, w, w_scale, xq_p, xs_p, xc_p, b, slot, total) -> None:
    """total += one block's dot, for a block past a row's steps: its 32 offset weight bytes `w` against the
    vector's block b in natural order (its scale and correction at `slot`), summed across the lanes."""
    v8i32, v32i8 = ir.VectorType(_I32, 8), ir.VectorType(_I8, 32)
    start = builder.insert_element(ir.Constant(v8i32, [ir.Constant(_I32, 0)] * 8),
                                   builder.load(builder.gep(xc_p, [slot])), ir.Constant(_I32, 0))
    x = _load(builder, xq_p, builder.mul(b, ir.Constant(b.type, BLOCK)), v32i8, 1)
    sums = builder.call(_dot4(builder, 8), [start, builder.bitcast(w, v8i32), builder.bitcast(x, v8i32)])
    block = builder.extract_element(sums, ir.Constant(_I32, 0))
    for i in range(1, 8):
        block = builder.add(block, builder.extract_element(sums, ir.Constant(_I32, i)))
    scale = builder.fmul(w_scale, builder.load(builder.gep(xs_p, [slot])), flags=_FAST)
    builder.store(builder.fadd(builder.load(total), builder.fmul(builder.sitofp(block, _F32), scale, flags=_FAST),
                               flags=_FAST), total)


def _tree_sum(builder, v):
    """Σ of a float vector's lanes by halves (16 → 8 → 4 → 2 → 1): four dependent adds where one lane at a time
    took fifteen, at the end of every row."""
    while v.type.count > 1:
        n = v.type.count // 2
        pick = lambda at: ir.Constant(ir.VectorType(_I32, n), list(range(at, at + n)))  # noqa: E731
        v = builder.fadd(builder.shuffle_vector(v, v, pick(0)), builder.shuffle_vector(v, v, pick(n)), flags=_FAST)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _scalef(builder, x, exponents):
    """x · 2^exponents, lane by lane (AVX-512's vscalefps; exact, subnormal results included)."""
    vf32 = x.type
    n = vf32.count
    if n == 16:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf32, [vf32, vf32, vf32, ir.IntType(16),
                                                                                   _I32]),
                                            "llvm.x86.avx512.mask.scalef.ps.512")
        return builder.call(fn, [x, exponents, x, ir.Constant(ir.IntType(16), -1), ir.Constant(_I32, 4)])
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf32, [vf32, vf32, vf32, _I8]),
                                        "llvm.x86.avx512.mask.scalef.ps.256")
    return builder.call(fn, [x, exponents, x, ir.Constant(_I8, -1)])


def _step_dot(builder, c, weights, w_scale, xq_p, xs_p, xc_p, b0, slot, lanes, exponents=False):
    """A step's scaled sums, float32 [lanes]: its weight vectors (`lanes` int32 each) against the vector's bytes
    from 32·b0 on, 4·lanes bytes each, less the corrections, times the vector's scales from `slot` and the weight
    scales `w_scale` (with `exponents`, their exponents: vscalefps)."""
    vi8, vf32 = ir.VectorType(_I8, 4 * lanes), ir.VectorType(_F32, lanes)
    dot4 = _dot4(builder, lanes)
    sums = _load(builder, xc_p, slot, ir.VectorType(_I32, lanes), 4)
    for j, w in enumerate(weights):
        at = builder.add(builder.mul(b0, c(BLOCK)), c(j * 4 * lanes))
        sums = builder.call(dot4, [sums, w, builder.bitcast(_load(builder, xq_p, at, vi8, 1), w.type)])
    x_scale = _load(builder, xs_p, slot, vf32, 4)
    if exponents:
        return _scalef(builder, builder.fmul(builder.sitofp(sums, vf32), x_scale, flags=_FAST), w_scale)
    return builder.fmul(builder.sitofp(sums, vf32), builder.fmul(w_scale, x_scale, flags=_FAST), flags=_FAST)


def _decode_row_dot(lanes: int, per_step: int, step, tail_block, half=None, exponents=False):
    """An intrinsic row_dot(row, xq, xs, xc, n_blocks): float32 Σ over n_blocks blocks of a row · a vector from
    quantize_vector: whole steps of `per_step` blocks, `step(builder, c, wp, b0)` giving the weight bytes of the
    step from block b0 (vectors of `lanes` int32, each against the next 4 · lanes bytes of the vector's values) and
    its per-lane weight scales; then, if `half` is (lanes / 2, per_step / 2, its step) and that many blocks are
    left, a half step; then the blocks past them one at a time, `tail_block(builder, c, wp, b)` giving a block's 32
    offset weight bytes and its scale (`_add_block`). `exponents`: the steps give their scales' exponents."""
    vf32 = ir.VectorType(_F32, lanes)

    @intrinsic
    def row_dot(typingctx, row, xq, xs, xc, n_blocks):
        sig = types.float32(row, xq, xs, xc, n_blocks)

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:4], args[:4])]
            wp = builder.bitcast(arrays[0].data, _I8.as_pointer())
            pointers = _vector_pointers(builder, arrays[1:])
            xq_p, xs_p, xc_p = pointers
            n_blocks = _i64(builder, args[4])
            c = lambda v: ir.Constant(_I64, v)  # noqa: E731
            acc = cgutils.alloca_once_value(builder, ir.Constant(vf32, [ir.Constant(_F32, 0.0)] * lanes))
            steps = builder.udiv(n_blocks, c(per_step))
            with cgutils.for_range(builder, steps) as loop:
                b0, slot = builder.mul(loop.index, c(per_step)), builder.mul(loop.index, c(lanes))
                weights, w_scale = step(builder, c, wp, b0)
                part = _step_dot(builder, c, weights, w_scale, *pointers, b0, slot, lanes, exponents)
                builder.store(builder.fadd(builder.load(acc), part, flags=_FAST), acc)
            done = cgutils.alloca_once_value(builder, builder.mul(steps, c(per_step)))
            slot0 = cgutils.alloca_once_value(builder, builder.mul(steps, c(lanes)))
            if half is not None:
                half_lanes, half_blocks, half_step = half
                b0, slot = builder.load(done), builder.load(slot0)
                with builder.if_then(builder.icmp_unsigned(">=", builder.sub(n_blocks, b0), c(half_blocks))):
                    weights, w_scale = half_step(builder, c, wp, b0)
                    part = _step_dot(builder, c, weights, w_scale, *pointers, b0, slot, half_lanes, exponents)
                    zeros = ir.Constant(part.type, [ir.Constant(_F32, 0.0)] * half_lanes)
                    widened = builder.shuffle_vector(part, zeros, ir.Constant(ir.VectorType(_I32, lanes),
                                                                              list(range(lanes))))
                    builder.store(builder.fadd(builder.load(acc), widened, flags=_FAST), acc)
                    builder.store(builder.add(b0, c(half_blocks)), done)
                    builder.store(builder.add(slot, c(half_lanes)), slot0)
            total = cgutils.alloca_once_value(builder, _tree_sum(builder, builder.load(acc)))
            first, slot = builder.load(done), builder.load(slot0)
            with cgutils.for_range(builder, builder.sub(n_blocks, first)) as loop:
                b = builder.add(first, loop.index)
                w, w_scale = tail_block(builder, c, wp, b)
                _add_block(builder, w, w_scale, xq_p, xs_p, xc_p, b, builder.add(slot, loop.index), total)
            return builder.load(total)

        return sig, codegen

    return row_dot


def mxfp4_row_dot(lanes: int):
    """The MXFP4 row dot of `lanes` int32 lanes. At 16 (AVX-512): a half step of 8, and the blocks' scales
    applied by vscalefps from their exponents (three operations a step where the float scales took seven)."""
    if lanes != 16:
        return _decode_row_dot(*_mxfp4_row_steps(lanes))
    half_lanes, half_blocks, half_step, _ = _mxfp4_row_steps(8, exponents=True)
    return _decode_row_dot(*_mxfp4_row_steps(16, exponents=True), (half_lanes, half_blocks, half_step),
                           exponents=True)


# As for the panels: without AVX-512 the 16-lane name stands for the 8-lane row dot (never called with 16 lanes:
# `decode_lanes`), so the kernels compile on every VNNI CPU.
_row_dot8 = mxfp4_row_dot(8)
_row_dot16 = mxfp4_row_dot(16) if DOT4 == "avx512vnni" else _row_dot8


@njit(cache=True, inline="always")
def row_dot_mxfp4(row, xq, xs, xc, n_blocks, lanes):
    """Σ over n_blocks blocks of the MXFP4 row · the vector quantize_vector made with `lanes` and MXFP4_OFFSET."""
    if lanes == 16:
        return _row_dot16(row, xq, xs, xc, n_blocks)
    return _row_dot8(row, xq, xs, xc, n_blocks)


# --- decode: one activation vector against Q8_0 rows ----------------------------------------------------------------
def _q8_0_row_steps(lanes: int):
    """`_decode_row_dot`'s arguments for Q8_0 rows, the vector from quantize_vector with Q8_0_BLOCK_LANES. A step
    takes lanes / 8 blocks: their value bytes side by side (+128 by a XOR of the sign bit) in one vector, each
    block's f16 scale in its 8 lanes."""
    per_step, nbytes = lanes // Q8_0_BLOCK_LANES, 4 * lanes
    vi32, vf32 = ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)
    v32i8 = ir.VectorType(_I8, 32)
    i16 = ir.IntType(16)
    sign = lambda n: ir.Constant(ir.VectorType(_I8, n), [ir.Constant(_I8, 0x80)] * n)  # noqa: E731
    # Scale bit patterns of a two-block step: 34 bytes (17 i16) apart, so one load of the step's first 32 i16
    # (inside its 68 bytes) holds both.
    spread = ir.Constant(ir.VectorType(_I32, lanes), [(i // Q8_0_BLOCK_LANES) * (Q8_0_BLOCK_BYTES // 2)
                                                      for i in range(lanes)])
    assert per_step <= 2

    def scale_of(builder, wp, base):
        return _f16_native(builder, builder.load(builder.bitcast(builder.gep(wp, [base]), i16.as_pointer()), align=1))

    def step(builder, c, wp, b0):
        base = builder.mul(b0, c(Q8_0_BLOCK_BYTES))
        _prefetch(builder, wp, base)
        values = [_load(builder, wp, builder.add(base, c(k * Q8_0_BLOCK_BYTES + 2)), v32i8, 1)
                  for k in range(per_step)]
        w = values[0] if per_step == 1 else builder.shuffle_vector(
            values[0], values[1], ir.Constant(ir.VectorType(_I32, nbytes), list(range(nbytes))))
        weights = [builder.bitcast(builder.xor(w, sign(nbytes)), vi32)]
        if per_step == 1:
            return weights, _splat(builder, scale_of(builder, wp, base), vf32)
        bits = _load(builder, wp, base, ir.VectorType(i16, 32), 1)
        return weights, _f16_native(builder, builder.shuffle_vector(bits, bits, spread))

    def tail_block(builder, c, wp, b):
        base = builder.mul(b, c(Q8_0_BLOCK_BYTES))
        return builder.xor(_load(builder, wp, builder.add(base, c(2)), v32i8, 1), sign(32)), scale_of(builder, wp, base)

    return lanes, per_step, step, tail_block


_row_dot_q8_0_8 = _decode_row_dot(*_q8_0_row_steps(8))
_row_dot_q8_0_16 = _decode_row_dot(*_q8_0_row_steps(16)) if DOT4 == "avx512vnni" else _row_dot_q8_0_8


@njit(cache=True, inline="always")
def row_dot_q8_0(row, xq, xs, xc, n_blocks, lanes):
    """Σ over n_blocks blocks of the Q8_0 row · the vector quantize_vector made with `lanes`, Q8_0_OFFSET and
    Q8_0_BLOCK_LANES."""
    if lanes == 16:
        return _row_dot_q8_0_16(row, xq, xs, xc, n_blocks)
    return _row_dot_q8_0_8(row, xq, xs, xc, n_blocks)


def decode_lanes() -> int:
    """int32 lanes a decode row dot takes at a time: 16 with AVX-512, else 8."""
    return 16 if DOT4 == "avx512vnni" else 8


_OFFSETS = {GGMLType.MXFP4: MXFP4_OFFSET, GGMLType.Q8_0: Q8_0_OFFSET}


def supports(weight_type) -> bool:
    """Whether this CPU has an int8 kernel for weights of this type."""
    return DOT4 is not None and weight_type in _OFFSETS


def lanes_for(n_tokens: float) -> int:
    """Tokens to a vector: 16 with AVX-512 unless so few tokens that most lanes would be padding."""
    return 16 if DOT4 == "avx512vnni" and n_tokens > 8 else 8


class Panel:
    """Activations X [T, H] quantized once for any number of matmuls with weights of one type (the offset of
    their decoded bytes is in the corrections), `lanes` tokens to a vector (default: `lanes_for(T)`)."""

    def __init__(self, X: np.ndarray, weight_type, lanes: int | None = None):
        self.n_tokens = X.shape[0]
        self.lanes = lanes_for(X.shape[0]) if lanes is None else lanes
        self.weight_type = weight_type
        self.arrays = quantize_panel(X, self.lanes, _OFFSETS[weight_type])

    @property
    def groups(self) -> int:
        return self.arrays[0].shape[0]


def matmul(data: np.ndarray, panel: Panel) -> np.ndarray:
    """panel's X @ W.T for raw weight rows `data` [R, bytes] of the panel's weight type: float32 [T, R]. The
    caller has checked shapes (rows of whole blocks matching X's width) and that the type is supported."""
    R = data.shape[0]
    out = np.empty((panel.groups * panel.lanes, -(-R // TASK_ROWS) * TASK_ROWS), dtype=np.float32)
    _matmul_panel(data, panel.weight_type == GGMLType.MXFP4, *panel.arrays, panel.n_tokens, out,
                  numba.get_num_threads())
    out = out[:panel.n_tokens, :R]
    return out if out.flags.c_contiguous else out.copy()
