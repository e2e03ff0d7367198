"""The CUDA backend's kernels under numba's CUDA simulator (NumPy arrays stand in for CuPy), each against a float64
NumPy reference written from the spec or against the CPU path's exact results (KV storage), at small odd shapes,
for every weight and cache type, and with several launch shapes: one lane per item (the simulator's default), and
lane groups of 8 and 32 that reduce through the (emulated) warp shuffles, over one and two blocks.

On a machine with a GPU and CuPy, `NUMBA_ENABLE_CUDASIM=0 pytest tests/test_cuda_kernels.py` runs the same tests on
the device (inputs go through device.to_device, results through device.to_host)."""

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



def _runnable() -> bool:
    if device.SIMULATOR:
        return True
    try:
        return device.xp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver
        return False


pytestmark = pytest.mark.skipif(not _runnable(), reason="needs the CUDA simulator or a GPU with CuPy")
dev, host = device.to_device, device.to_host

ONE_LANE = [Launch(1, 32, 1), Launch(2, 64, 1)]  # one lane per item: one block, two blocks
# Lane groups of 8 and 32 reduce through the emulated shuffles, two groups per block in two blocks; each simulated
# shuffle costs two barriers (~2 ms each), so the costlier kernels test them at one storage type.
SHUFFLES = [Launch(2, 64, 8), Launch(2, 64, 32)]
GROUPS = ONE_LANE[:1] + SHUFFLES


def launch_id(launch: Launch) -> str:
    return f"{launch.blocks}x{launch.threads}/{launch.group}"
WEIGHT_TYPES = [GGMLType.MXFP4, GGMLType.Q8_0, GGMLType.BF16, GGMLType.F16, GGMLType.F32]


@pytest.fixture(autouse=True, scope="module")
def _fast_barriers():
    with device.switch_interval(device.BARRIER_SWITCH_INTERVAL):
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
    """A tensor on the device; `.stored` keeps the host copy of its data for the reference."""
    stored = quantize(rng.standard_normal(shape).astype(np.float32), wtype)
    return SimpleNamespace(name=name, type=wtype, shape=shape, data=dev(stored), stored=stored)


def close_f32(got, want, scale=1.0):
    """Device result `got` within float32 rounding of sums whose terms are up to `scale` in size."""
    np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-5 * scale)


def equal(got, want):
    np.testing.assert_array_equal(host(got), want)


# --- weights --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launch", ONE_LANE, ids=launch_id)
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_dequantize_every_type_to_f32_and_f16(rng, wtype, launch):
    w = weight(rng, (5, 96), wtype)
    want = dequantized(w.stored, wtype)
    equal(kernels.dequantize(w, launch=launch), want.astype(np.float32))
    equal(kernels.dequantize(w, dtype=np.float16, launch=launch), want.astype(np.float16))


@pytest.mark.parametrize("wtype", [GGMLType.MXFP4, GGMLType.Q8_0])
def test_dequantize_one_expert_of_three(rng, wtype):
    w = weight(rng, (3, 7, 64), wtype)
    equal(kernels.dequantize(w, first_row=7, n_rows=7), dequantized(w.stored[1], wtype).astype(np.float32))
    with pytest.raises(ValueError, match="outside"):
        kernels.dequantize(w, first_row=15, n_rows=7)


@pytest.mark.parametrize("wtype", [GGMLType.Q8_0, GGMLType.BF16, GGMLType.F16, GGMLType.F32])
def test_embed_rows_of_tokens(rng, wtype):
    w = weight(rng, (11, 64), wtype)
    tokens = np.array([3, 0, 10, 3])
    equal(kernels.embed(w, tokens), dequantized(w.stored, wtype)[tokens].astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        kernels.embed(w, np.array([11]))


def test_rows_read_from_device_memory_are_bounded(rng):
    """Token ids the wrapper cannot see (on a GPU: a device array) are bounded in the kernel: NaN rows, no read
    outside the tensor."""
    w = weight(rng, (4, 32), GGMLType.F32)
    out = device.zeros((3, 32))
    kernels._DEQUANTIZE[GGMLType.F32][1, 32](w.data, w.data, kernels._e2m1_table(), dev(np.array([-1, 2, 4])), 0,
                                             out)
    out = host(out)
    assert np.isnan(out[[0, 2]]).all()
    np.testing.assert_array_equal(out[1], w.stored[2])


def test_f16_weights_may_be_given_as_bits(rng):
    w = weight(rng, (3, 32), GGMLType.F16)
    bits = SimpleNamespace(name="w", type=GGMLType.F16, shape=w.shape, data=w.data.view(np.uint16))
    equal(kernels.dequantize(bits), host(kernels.dequantize(w)))


@pytest.mark.parametrize("launch", GROUPS, ids=launch_id)
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_matvec_every_type(rng, wtype, launch):
    w = weight(rng, (13, 96), wtype)
    x = rng.standard_normal(96).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    want = dequantized(w.stored, wtype) @ x
    close_f32(kernels.matvec(w, dev(x), launch=launch), want, 10)
    residual = rng.standard_normal(13).astype(np.float32)
    out = dev(residual.copy())  # under the simulator dev() keeps the array itself
    kernels.matvec(w, dev(x), bias=dev(bias), out=out, accumulate=True, launch=launch)
    close_f32(out, residual + want + bias, 10)


def test_matvec_checks_its_arguments(rng):
    w = weight(rng, (4, 64), GGMLType.Q8_0)
    x = device.zeros(64)
    with pytest.raises(ValueError, match="input"):
        kernels.matvec(w, device.zeros(32))
    with pytest.raises(ValueError, match="bias"):
        kernels.matvec(w, x, bias=device.zeros(5))
    with pytest.raises(ValueError, match="must be uint8"):
        kernels.matvec(SimpleNamespace(name="w", type=GGMLType.Q8_0, shape=(4, 64), data=dev(w.stored[:, :-1])), x)
    with pytest.raises(ValueError, match="whole blocks"):
        kernels.matvec(SimpleNamespace(name="w", type=GGMLType.MXFP4, shape=(4, 48), data=w.data), device.zeros(48))
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
    return gate, up, down, biases, [dev(b) for b in biases]


@pytest.mark.parametrize("launch", ONE_LANE[:1] + SHUFFLES[:1], ids=launch_id)
def test_moe_decode_against_the_spec(rng, launch):
    gate, up, down, (gate_b, up_b, down_b), on_device = experts(rng)
    x = rng.standard_normal(64).astype(np.float32)
    ids = np.array([4, 0, 2], np.int32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    alpha, limit = 1.702, 1.5  # a low limit, so the clamps are reached
    G, U, D = (dequantized(w.stored, GGMLType.MXFP4) for w in (gate, up, down))
    want = sum(wt * (D[e] @ swiglu_reference(G[e] @ x + gate_b[e], U[e] @ x + up_b[e], alpha, limit) + down_b[e])
               for e, wt in zip(ids, weights))
    residual = rng.standard_normal(64).astype(np.float32)
    out = dev(residual.copy())  # under the simulator dev() keeps the array itself
    kernels.moe_decode(gate, up, down, *on_device, dev(x), dev(ids), dev(weights), alpha=alpha, limit=limit, out=out,
                       accumulate=True, launch=launch)
    close_f32(out, residual + want, 10)


def test_moe_decode_invalid_expert_id_gives_nan(rng):
    gate, up, down, _, biases = experts(rng, E=2, I=32, H=32)
    out = kernels.moe_decode(gate, up, down, *biases, dev(np.ones(32, np.float32)), dev(np.array([1, 2])),
                             dev(np.array([0.5, 0.5], np.float32)), alpha=1.702, limit=7.0)
    assert np.isnan(host(out)).all()


def test_swiglu_rows(rng):
    g, u = (rng.standard_normal((3, 40)).astype(np.float32) * 4 for _ in range(2))
    gb, ub = (rng.standard_normal(40).astype(np.float32) for _ in range(2))
    want = swiglu_reference(g + gb.astype(np.float64), u + ub.astype(np.float64), 1.702, 7.0)
    close_f32(kernels.swiglu(dev(g), dev(u), dev(gb), dev(ub), alpha=1.702, limit=7.0), want)


# --- small ops ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launch", GROUPS, ids=launch_id)
def test_rms_norm(rng, launch):
    x = rng.standard_normal((3, 71)).astype(np.float32) * 3
    gain = rng.standard_normal(71).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5) * gain
    close_f32(kernels.rms_norm(dev(x), dev(gain), 1e-5, launch=launch), want)


def rope_reference(v, positions, inv_freq, concentration):
    """Spec §2.3 half-split rotation in float64."""
    half = v.shape[-1] // 2
    angles = positions[:, None] * inv_freq[None, :]
    c, s = (f(angles)[:, None, :] * concentration for f in (np.cos, np.sin))
    a, b = v[..., :half].astype(np.float64), v[..., half:].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@pytest.mark.parametrize("launch", ONE_LANE, ids=launch_id)
@pytest.mark.parametrize("start_on_device", [False, True])
def test_rope_q_and_k_in_place(rng, launch, start_on_device):
    T, d = 3, 16
    q = rng.standard_normal((T, 4, d)).astype(np.float32)
    k = rng.standard_normal((T, 2, d)).astype(np.float32)
    inv_freq = 1.0 / 1000.0 ** (np.arange(d // 2) / (d // 2))
    want_q, want_k = (rope_reference(v, 1000 + np.arange(T), inv_freq, 1.3) for v in (q, k))
    start = dev(np.array([1000], np.int32)) if start_on_device else 1000
    q, k = dev(q), dev(k)
    kernels.rope(q, k, dev(inv_freq), 1.3, start, launch=launch)
    close_f32(q, want_q, 4)
    close_f32(k, want_k, 4)


@pytest.mark.parametrize("launch", ONE_LANE, ids=launch_id)
def test_router_top_k_softmax(rng, launch):
    logits = rng.standard_normal((3, 9)).astype(np.float32)
    logits[2, [1, 5, 7]] = 4.0  # a tie: the lowest index comes first
    ids, weights = kernels.router(dev(logits), 4, launch=launch)
    ids = host(ids)
    for t in range(3):
        top = np.argsort(-logits[t].astype(np.float64), kind="stable")[:4]
        np.testing.assert_array_equal(ids[t], top)
        p = np.exp(logits[t, top] - logits[t, top].max())
        close_f32(weights[t], p / p.sum())
    assert ids.dtype == np.int32 and ids[2, :3].tolist() == [1, 5, 7]


# --- KV cache and attention -----------------------------------------------------------------------------------------
N_KV, HEAD_DIM = 2, 32


def layer_arrays(kv_type, capacity):
    """The CPU cache's zeroed arrays for one layer (the same layout the CUDA cache uses), on the device."""
    layer = LayerKV(N_KV, capacity, HEAD_DIM, kv_type, window=capacity)
    return [None if a is None else dev(a) for a in (layer.keys, layer.values, layer.key_scales, layer.value_scales)]


@pytest.mark.parametrize("launch", ONE_LANE, ids=launch_id)
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
        where = dev(np.array([start], np.int32)) if start == 7 else start
        kernels.kv_store(keys, values, key_scales, value_scales, dev(k), dev(v), where, launch=launch)
    for got, want in zip((keys, values, key_scales, value_scales), cpu.arrays + [None] * 2):
        if want is not None:
            equal(got, want)


def cache_values(stored, scales):
    """A cache's stored keys or values as float64 [n_kv, capacity, d]."""
    stored, scales = host(stored), None if scales is None else host(scales)
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


@pytest.mark.parametrize("kv_type, layer, launch", [
    pytest.param(kv_type, layer, launch, id=f"{kv_type}-{layer}-{launch_id(launch)}")
    for kv_type, layer, launches in [(t, name, ONE_LANE) for t in ("f32", "f16", "q8_0") for name in LAYERS]
    + [("f16", "sliding", SHUFFLES)] for launch in launches])
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
        kernels.kv_store(keys, values, key_scales, value_scales, dev(k), dev(v), start)
        got = kernels.attend(dev(q), keys, values, key_scales, value_scales, start, window, dev(sinks), 0.25,
                             launch=launch)
        want = attention_reference(q, cache_values(keys, key_scales), cache_values(values, value_scales), start,
                                   window, capacity, sinks, 0.25)
        close_f32(got, want)


def test_attention_start_from_device_memory(rng):
    """A replayed decode step reads its position from a device int32 [1]: the same result as the host int."""
    keys, values = (dev(rng.standard_normal((N_KV, 8, HEAD_DIM)).astype(np.float32)) for _ in range(2))
    q = dev(rng.standard_normal((1, 4, HEAD_DIM)).astype(np.float32))
    sinks = device.zeros(4)
    at_host = kernels.attend(q, keys, values, None, None, 9, 4, sinks, 0.2)
    at_device = kernels.attend(q, keys, values, None, None, dev(np.array([9], np.int32)), 4, sinks, 0.2)
    equal(at_device, host(at_host))


def test_attention_checks_its_arguments(rng):
    keys, values, key_scales, value_scales = layer_arrays("q8_0", 6)
    q = device.zeros((1, 3, HEAD_DIM))
    with pytest.raises(ValueError, match="multiple of 2"):
        kernels.attend(q, keys, values, key_scales, value_scales, 0, 4, device.zeros(3), 1.0)
    q = device.zeros((4, 4, HEAD_DIM))
    with pytest.raises(ValueError, match="do not fit 6 slots"):
        kernels.attend(q, keys, values, key_scales, value_scales, 10, 4, device.zeros(4), 1.0)
    with pytest.raises(ValueError, match="q8_0 needs"):
        kernels.attend(q, keys, values, None, None, 0, 4, device.zeros(4), 1.0)
