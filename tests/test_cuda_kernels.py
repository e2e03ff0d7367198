"""The CUDA backend's kernels under numba's CUDA simulator (NumPy arrays stand in for CuPy), each against a float64
NumPy reference written from the spec or against the CPU path's exact results (KV storage), at small odd shapes,
for every weight and cache type, and with several launch shapes: one lane per item (the simulator's default), and
lane groups of 8 and 32 that reduce through the (emulated) warp shuffles, over one and two blocks."""

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba.cuda is imported (conftest does it too)

from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType
from gguf import quants

from ossrt.engine.cuda import device, kernels
from ossrt.engine.cuda.device import Launch
from ossrt.engine.kv_cache import LayerKV
from ossrt.format import mxfp4

pytestmark = pytest.mark.skipif(not device.SIMULATOR, reason="runs the kernels under the CUDA simulator")

ONE_LANE = [Launch(1, 32, 1), Launch(2, 64, 1)]  # one lane per item: one block, two blocks
# Lane groups of 8 and 32 reduce through the emulated shuffles, two groups per block in two blocks; each simulated
# shuffle costs two barriers (~2 ms each), so the costlier kernels test them at one storage type.
SHUFFLES = [Launch(2, 64, 8), Launch(2, 64, 32)]
GROUPS = ONE_LANE[:1] + SHUFFLES
WEIGHT_TYPES = [GGMLType.MXFP4, GGMLType.Q8_0, GGMLType.BF16, GGMLType.F16, GGMLType.F32]
F32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _fast_barriers():
    with device.fast_barriers():
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def quantize(values: np.ndarray, wtype: GGMLType) -> np.ndarray:
    """values float32 [..., n] as the file stores them (uint8 blocks, uint16 bf16 bits, float16, float32)."""
    if wtype == GGMLType.MXFP4:
        return mxfp4.quantize_gguf(values)
    data = quants.quantize(values, wtype)
    return data.view(np.uint16) if wtype == GGMLType.BF16 else data


def dequantized(data: np.ndarray, wtype: GGMLType) -> np.ndarray:
    """The reference's float64 values of stored data (spec §3.3 MXFP4 in NumPy; gguf's own dequantizers)."""
    if wtype == GGMLType.MXFP4:
        return mxfp4.dequantize_gguf(data).astype(np.float64)
    raw = data.view(np.uint8) if wtype == GGMLType.BF16 else data
    return quants.dequantize(raw, wtype).astype(np.float64)


def weight(rng, shape, wtype, name="w"):
    values = rng.standard_normal(shape).astype(np.float32)
    return SimpleNamespace(name=name, type=wtype, shape=shape, data=quantize(values, wtype))


def close_f32(got, want, scale=1.0):
    """Within float32 rounding of sums whose terms are up to `scale` in size."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


# --- weights --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launch", ONE_LANE)
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_dequantize_every_type_to_f32_and_f16(rng, wtype, launch):
    w = weight(rng, (5, 96), wtype)
    want = dequantized(w.data, wtype)
    np.testing.assert_array_equal(kernels.dequantize(w, launch=launch), want.astype(np.float32))
    np.testing.assert_array_equal(kernels.dequantize(w, dtype=np.float16, launch=launch), want.astype(np.float16))


@pytest.mark.parametrize("wtype", [GGMLType.MXFP4, GGMLType.Q8_0])
def test_dequantize_one_expert_of_three(rng, wtype):
    w = weight(rng, (3, 7, 64), wtype)
    got = kernels.dequantize(w, first_row=7, n_rows=7)
    np.testing.assert_array_equal(got, dequantized(w.data[1], wtype).astype(np.float32))
    with pytest.raises(ValueError, match="outside"):
        kernels.dequantize(w, first_row=15, n_rows=7)


@pytest.mark.parametrize("wtype", [GGMLType.Q8_0, GGMLType.BF16, GGMLType.F16, GGMLType.F32])
def test_embed_rows_of_tokens(rng, wtype):
    w = weight(rng, (11, 64), wtype)
    tokens = np.array([3, 0, 10, 3])
    np.testing.assert_array_equal(kernels.embed(w, tokens), dequantized(w.data, wtype)[tokens].astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        kernels.embed(w, np.array([11]))


def test_rows_read_from_device_memory_are_bounded(rng):
    """Token ids the wrapper cannot see (on a GPU: a device array) are bounded in the kernel: NaN rows, no read
    outside the tensor."""
    w = weight(rng, (4, 32), GGMLType.F32)
    out = np.zeros((3, 32), np.float32)
    kernels._DEQUANTIZE[GGMLType.F32][1, 32](w.data, w.data, kernels._e2m1_table(), np.array([-1, 2, 4]), 0, out)
    assert np.isnan(out[[0, 2]]).all()
    np.testing.assert_array_equal(out[1], w.data[2])


def test_f16_weights_may_be_given_as_bits(rng):
    w = weight(rng, (3, 32), GGMLType.F16)
    bits = SimpleNamespace(name="w", type=GGMLType.F16, shape=w.shape, data=w.data.view(np.uint16))
    np.testing.assert_array_equal(kernels.dequantize(bits), kernels.dequantize(w))


@pytest.mark.parametrize("launch", GROUPS)
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_matvec_every_type(rng, wtype, launch):
    w = weight(rng, (13, 96), wtype)
    x = rng.standard_normal(96).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    want = dequantized(w.data, wtype) @ x
    close_f32(kernels.matvec(w, x, launch=launch), want, 10)
    residual = rng.standard_normal(13).astype(np.float32)
    out = residual.copy()
    kernels.matvec(w, x, bias=bias, out=out, accumulate=True, launch=launch)
    close_f32(out, residual + want + bias, 10)


def test_matvec_checks_its_arguments(rng):
    w = weight(rng, (4, 64), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="input"):
        kernels.matvec(w, np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="bias"):
        kernels.matvec(w, np.zeros(64, np.float32), bias=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        kernels.matvec(SimpleNamespace(name="w", type=GGMLType.Q8_0, shape=(4, 64), data=w.data[:, :-1].copy()),
                       np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="whole blocks"):
        kernels.matvec(SimpleNamespace(name="w", type=GGMLType.MXFP4, shape=(4, 48), data=w.data), np.zeros(48))
    with pytest.raises(ValueError, match="whole warps"):
        Launch(1, 48, 1)


# --- mixture of experts ---------------------------------------------------------------------------------------------
def swiglu_reference(g, u, alpha, limit):
    """Spec §2.6 in float64."""
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return g / (1 + np.exp(-alpha * g)) * (u + 1)


def experts(rng, E=5, I=32, H=64):
    gate, up = weight(rng, (E, I, H), GGMLType.MXFP4, "gate"), weight(rng, (E, I, H), GGMLType.MXFP4, "up")
    down = weight(rng, (E, H, I), GGMLType.MXFP4, "down")
    biases = [rng.standard_normal(s).astype(np.float32) for s in ((E, I), (E, I), (E, H))]
    return gate, up, down, biases


@pytest.mark.parametrize("launch", ONE_LANE[:1] + SHUFFLES[:1])
def test_moe_decode_against_the_spec(rng, launch):
    gate, up, down, (gate_b, up_b, down_b) = experts(rng)
    x = rng.standard_normal(64).astype(np.float32)
    ids = np.array([4, 0, 2], np.int32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    alpha, limit = 1.702, 1.5  # a low limit, so the clamps are reached
    G, U, D = (dequantized(w.data, GGMLType.MXFP4) for w in (gate, up, down))
    want = sum(wt * (D[e] @ swiglu_reference(G[e] @ x + gate_b[e], U[e] @ x + up_b[e], alpha, limit) + down_b[e])
               for e, wt in zip(ids, weights))
    residual = rng.standard_normal(64).astype(np.float32)
    out = residual.copy()
    kernels.moe_decode(gate, up, down, gate_b, up_b, down_b, x, ids, weights, alpha=alpha, limit=limit, out=out,
                       accumulate=True, launch=launch)
    close_f32(out, residual + want, 10)


def test_moe_decode_invalid_expert_id_gives_nan(rng):
    gate, up, down, biases = experts(rng, E=2, I=32, H=32)
    out = kernels.moe_decode(gate, up, down, *biases, np.ones(32, np.float32), np.array([1, 2], np.int64),
                             np.array([0.5, 0.5], np.float32), alpha=1.702, limit=7.0)
    assert np.isnan(out).all()


def test_swiglu_rows(rng):
    g, u = (rng.standard_normal((3, 40)).astype(np.float32) * 4 for _ in range(2))
    gb, ub = (rng.standard_normal(40).astype(np.float32) for _ in range(2))
    want = swiglu_reference(g + gb.astype(np.float64), u + ub.astype(np.float64), 1.702, 7.0)
    close_f32(kernels.swiglu(g, u, gb, ub, alpha=1.702, limit=7.0), want)


# --- small ops ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launch", GROUPS)
def test_rms_norm(rng, launch):
    x = rng.standard_normal((3, 71)).astype(np.float32) * 3
    gain = rng.standard_normal(71).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5) * gain
    close_f32(kernels.rms_norm(x, gain, 1e-5, launch=launch), want)


def rope_reference(v, positions, inv_freq, concentration):
    """Spec §2.3 half-split rotation in float64."""
    half = v.shape[-1] // 2
    angles = positions[:, None] * inv_freq[None, :]
    c, s = (f(angles)[:, None, :] * concentration for f in (np.cos, np.sin))
    a, b = v[..., :half].astype(np.float64), v[..., half:].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@pytest.mark.parametrize("launch", ONE_LANE)
@pytest.mark.parametrize("start_on_device", [False, True])
def test_rope_q_and_k_in_place(rng, launch, start_on_device):
    T, d = 3, 16
    q = rng.standard_normal((T, 4, d)).astype(np.float32)
    k = rng.standard_normal((T, 2, d)).astype(np.float32)
    inv_freq = 1.0 / 1000.0 ** (np.arange(d // 2) / (d // 2))
    want_q, want_k = (rope_reference(v, 1000 + np.arange(T), inv_freq, 1.3) for v in (q, k))
    start = np.array([1000], np.int32) if start_on_device else 1000
    kernels.rope(q, k, inv_freq, 1.3, start, launch=launch)
    close_f32(q, want_q, 4)
    close_f32(k, want_k, 4)


@pytest.mark.parametrize("launch", ONE_LANE)
def test_router_top_k_softmax(rng, launch):
    logits = rng.standard_normal((3, 9)).astype(np.float32)
    logits[2, [1, 5, 7]] = 4.0  # a tie: the lowest index comes first
    ids, weights = kernels.router(logits, 4, launch=launch)
    for t in range(3):
        top = np.argsort(-logits[t].astype(np.float64), kind="stable")[:4]
        np.testing.assert_array_equal(ids[t], top)
        p = np.exp(logits[t, top] - logits[t, top].max())
        close_f32(weights[t], p / p.sum())
    assert ids.dtype == np.int32 and ids[2, :3].tolist() == [1, 5, 7]


# --- KV cache and attention -----------------------------------------------------------------------------------------
N_KV, HEAD_DIM = 2, 32


def layer_arrays(kv_type, capacity):
    """The CPU cache's zeroed arrays for one layer (the same layout the CUDA cache uses)."""
    layer = LayerKV(N_KV, capacity, HEAD_DIM, kv_type, window=capacity)
    return layer.keys.copy(), layer.values.copy(), layer.key_scales, layer.value_scales


@pytest.mark.parametrize("launch", ONE_LANE)
@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_kv_store_equals_the_cpu_cache_across_the_ring(rng, kv_type, launch):
    """Positions 0..10 stored in steps into 6 slots (the ring wraps twice), one step's start from device memory:
    the same bits as the CPU cache's store (f16 round to nearest even; q8_0 llama.cpp's rule)."""
    cpu = LayerKV(N_KV, 6, HEAD_DIM, kv_type, window=4)
    keys, values, key_scales, value_scales = layer_arrays(kv_type, 6)
    for start, T in ((0, 4), (4, 3), (7, 1), (8, 3)):
        k = rng.standard_normal((T, N_KV, HEAD_DIM)).astype(np.float32)
        v = rng.standard_normal((T, N_KV, HEAD_DIM)).astype(np.float32)
        k[0, 0, :3] = [0.0, -0.0, 1e-30]
        cpu.store(start, k, v)
        where = np.array([start], np.int32) if start == 7 else start
        kernels.kv_store(keys, values, key_scales, value_scales, k, v, where, launch=launch)
    for got, want in zip((keys, values, key_scales, value_scales), cpu.arrays + [None] * 2):
        if want is not None:
            np.testing.assert_array_equal(got, want)


def cache_values(stored, scales):
    """A cache's stored keys or values as float64 [n_kv, capacity, d]."""
    if stored.dtype == np.uint16:
        return stored.view(np.float16).astype(np.float64)
    if stored.dtype == np.int8:
        return stored.astype(np.float64) * np.repeat(scales, 32, axis=-1)
    return stored.astype(np.float64)


def attention_reference(q, keys, values, start, window, capacity, sinks, scale):
    """Spec §2.4 in float64 over the cached values: query t at position start + t sees positions
    max(0, p - window + 1) .. p, held in slot position % capacity; the sink only in the denominator."""
    T, n_head, d = q.shape
    out = np.zeros((T, n_head, d))
    for t in range(T):
        p = start + t
        slots = np.arange(max(0, p - window + 1), p + 1) % capacity
        for h in range(n_head):
            g = h // (n_head // keys.shape[0])
            a = keys[g, slots] @ q[t, h].astype(np.float64) * scale
            z = np.logaddexp(np.logaddexp.reduce(a), sinks[h])
            out[t, h] = np.exp(a - z) @ values[g, slots]
    return out


# (window, capacity, steps of (start, T)): a sliding layer's ring (window 4 plus a chunk of 3, less one) that wraps,
# the last query block straddling the wrap; a full layer whose window is its capacity.
LAYERS = {"sliding": (4, 6, ((0, 3), (3, 3), (6, 1), (7, 3))), "full": (12, 12, ((0, 3), (3, 1), (4, 5)))}


@pytest.mark.parametrize("kv_type, layer, launch", [(kv_type, layer, launch) for kv_type in ("f32", "f16", "q8_0")
                                                    for layer in LAYERS for launch in ONE_LANE]
                         + [("f16", "sliding", launch) for launch in SHUFFLES])
def test_attention_with_sinks_decode_and_prefill(rng, kv_type, layer, launch):
    """4 query heads over 2 KV heads (GQA); after each step stored, its block of queries (prefill) or its one
    query (decode) attends over the cache. The reference reads the same stored values, so the tolerance is float32
    rounding whatever the storage type."""
    window, capacity, steps = LAYERS[layer]
    keys, values, key_scales, value_scales = layer_arrays(kv_type, capacity)
    sinks = rng.standard_normal(4).astype(np.float32)
    for start, T in steps:
        k = rng.standard_normal((T, N_KV, HEAD_DIM)).astype(np.float32)
        v = rng.standard_normal((T, N_KV, HEAD_DIM)).astype(np.float32)
        q = rng.standard_normal((T, 4, HEAD_DIM)).astype(np.float32)
        kernels.kv_store(keys, values, key_scales, value_scales, k, v, start)
        got = kernels.attend(q, keys, values, key_scales, value_scales, start, window, sinks, 0.25, launch=launch)
        want = attention_reference(q, cache_values(keys, key_scales), cache_values(values, value_scales), start,
                                   window, capacity, sinks, 0.25)
        close_f32(got, want)


def test_attention_start_from_device_memory(rng):
    """A replayed decode step reads its position from a device int32 [1]: the same result as the host int."""
    keys, values, _, _ = layer_arrays("f32", 8)
    keys[...] = rng.standard_normal(keys.shape)
    values[...] = rng.standard_normal(values.shape)
    q = rng.standard_normal((1, 4, HEAD_DIM)).astype(np.float32)
    sinks = np.zeros(4, np.float32)
    at_host = kernels.attend(q, keys, values, None, None, 9, 4, sinks, 0.2)
    at_device = kernels.attend(q, keys, values, None, None, np.array([9], np.int32), 4, sinks, 0.2)
    np.testing.assert_array_equal(at_device, at_host)


def test_attention_checks_its_arguments(rng):
    keys, values, key_scales, value_scales = layer_arrays("q8_0", 6)
    q = np.zeros((1, 3, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="multiple of 2"):
        kernels.attend(q, keys, values, key_scales, value_scales, 0, 4, np.zeros(3, np.float32), 1.0)
    q = np.zeros((4, 4, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="do not fit 6 slots"):
        kernels.attend(q, keys, values, key_scales, value_scales, 10, 4, np.zeros(4, np.float32), 1.0)
    with pytest.raises(ValueError, match="q8_0 needs"):
        kernels.attend(q, keys, values, None, None, 0, 4, np.zeros(4, np.float32), 1.0)
