"""The 8-bit-activation kernels (`engine.int8`): prefill's matmuls, and in decode the MoE's experts and the Q8_0
matrices. The activation quantizer and the VNNI kernels against NumPy written from the rule (per 32 values: scale =
max |x| / 127, values rounded to nearest), then the error the quantization adds, measured against the float32 path:
kernels, MoE, and the whole model's logits and greedy text, in prefill and in decode."""

from types import SimpleNamespace

import numpy as np
import pytest
from numba import njit
from gguf import GGMLQuantizationType as T

import ossrt
from ossrt.engine import int8, kernels
from ossrt.engine.reference import weight as dequantized
from ossrt.errors import ParameterError
from ossrt.format import mxfp4
from ossrt.format.modelfile import Tensor

from test_kernels import make_tensor

pytestmark = pytest.mark.skipif(int8.DOT4 is None, reason="this CPU has no VNNI: everything stays float32")


def quantized(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule in NumPy, in float32: int8 values and scales [T, blocks]."""
    blocks = X.reshape(X.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)
    q = np.rint(blocks / np.where(d > 0, d, 1)[..., None]).astype(np.int8)
    return q.reshape(X.shape), d


@pytest.mark.parametrize("lanes", [8, 16])
def test_panel_holds_each_tokens_quantized_blocks(lanes):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((lanes + 3, 96)) * 4).astype(np.float32)
    X[1, :32] = 0  # an all-zero block
    X[2, 32:64] = rng.standard_normal(32) * 1e-41  # denormals: 127 / amax would overflow
    X[3, 64:] = np.float32(3e38) * np.sign(rng.standard_normal(32))
    panel, scales, corrections = int8.quantize_panel(X, lanes, offset=12)
    q, d = quantized(X)
    groups = panel.shape[0]
    assert panel.shape == (2, 3, 8, lanes, 4) and scales.shape == corrections.shape == (2, 3, lanes)
    # panel[group, block, g, lane, i] is value 4g + i of that block of token group·lanes + lane
    values = panel.transpose(0, 3, 1, 2, 4).reshape(groups * lanes, 96)
    np.testing.assert_array_equal(values[:len(X)], q)
    np.testing.assert_array_equal(values[len(X):], 0)
    flat_scales = scales.transpose(0, 2, 1).reshape(groups * lanes, 3)
    np.testing.assert_array_equal(flat_scales[:len(X)], d)
    np.testing.assert_array_equal(flat_scales[len(X):], 0)
    sums = q.reshape(len(X), 3, 32).astype(np.int32).sum(axis=-1)
    np.testing.assert_array_equal(corrections.transpose(0, 2, 1).reshape(groups * lanes, 3)[:len(X)], -12 * sums)


def test_non_finite_activations_give_non_finite_products():
    w = make_tensor(np.ones((16, 64)), T.Q8_0)
    X = np.ones((9, 64), dtype=np.float32)
    X[2, 5], X[4, 40] = np.nan, np.inf
    out = int8.matmul(w.data, int8.Panel(X, w.type))
    bad = ~np.isfinite(out)
    assert bad[2].all() and bad[4].all() and not bad[[0, 1, 3, 5, 6, 7, 8]].any()


@pytest.mark.parametrize("qtype", [T.Q8_0, T.MXFP4])
@pytest.mark.parametrize("n_tokens", [2, 5, 8, 9, 24, 33, 150])  # 8, 16 lanes; odd, half-full groups; tiles
@pytest.mark.parametrize("shape", [(1, 32), (37, 96), (300, 2880)])
def test_kernel_is_the_exact_product_of_the_quantized_values(qtype, n_tokens, shape):
    """Integer sums are exact and only the float32 steps round: equal to a float64 product of the quantized
    activations and the dequantized weights to float32 precision."""
    rng = np.random.default_rng(n_tokens)
    w = make_tensor(rng.standard_normal(shape) * 2, qtype)
    X = (rng.standard_normal((n_tokens, shape[1])) * 3).astype(np.float32)
    got = kernels.matmul(w, X, int8_activations=True)
    q, d = quantized(X)
    Xq = (q.reshape(n_tokens, -1, 32) * d[..., None].astype(np.float64)).reshape(X.shape)
    expect = Xq @ dequantized(w).T
    assert got.shape == (n_tokens, shape[0]) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())


def test_avx_vnni_cpus_take_eight_tokens_a_vector(monkeypatch):
    """Without AVX-512 (AVX-VNNI: Alder Lake and later cores) every panel has 8 lanes; the numbers are the same."""
    rng = np.random.default_rng(6)
    w = make_tensor(rng.standard_normal((40, 96)), T.MXFP4)
    X = rng.standard_normal((37, 96)).astype(np.float32)
    wide = kernels.matmul(w, X, int8_activations=True)
    monkeypatch.setattr(int8, "DOT4", "avxvnni")
    assert int8.Panel(X, w.type).lanes == 8
    np.testing.assert_array_equal(kernels.matmul(w, X, int8_activations=True), wide)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.MXFP4])
def test_quantization_error_against_float32(qtype):
    """The error 8-bit activations add, on Gaussian data at the 20b's width: below 1 % of the outputs' largest
    magnitude (measured: 0.4-0.7 %), and unbiased."""
    rng = np.random.default_rng(3)
    w = make_tensor(rng.standard_normal((256, 2880)), qtype)
    X = rng.standard_normal((64, 2880)).astype(np.float32)
    exact = kernels.matmul(w, X)
    err = kernels.matmul(w, X, int8_activations=True) - exact
    assert np.abs(err).max() < 0.01 * np.abs(exact).max()
    assert abs(err.mean()) < 0.01 * err.std()
    assert kernels.matmul(w, X, int8_activations=False).tobytes() == exact.tobytes()
    # one token's linear: Q8_0 matrices decode in int8 too (`row_dot_q8_0`), a 2-D MXFP4 one stays float32
    one = kernels.linear(w, X[:1], int8_activations=True)
    assert (one.tobytes() != kernels.linear(w, X[:1]).tobytes()) == (qtype == T.Q8_0)


def test_moe_with_int8_activations_stays_close_to_float32():
    """Two quantized matmuls in a row, the second on SwiGLU's heavy-tailed outputs: an RMS error of about 1 % of
    the outputs' (measured: 1.1 %)."""
    rng = np.random.default_rng(4)
    E, I, H, n = 4, 64, 96, 40
    gate, up = (make_tensor(rng.standard_normal((E, I, H)), T.MXFP4, name) for name in ("gate", "up"))
    down = make_tensor(rng.standard_normal((E, H, I)), T.MXFP4, "down")
    biases = [rng.standard_normal(s).astype(np.float32) for s in ((E, I), (E, I), (E, H))]
    X = rng.standard_normal((n, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:2] for _ in range(n)])
    weights = rng.dirichlet([1, 1], n).astype(np.float32)
    args = (gate, up, down, *biases, X, ids, weights)
    exact = kernels.moe(*args, alpha=1.702, limit=7.0)
    got = kernels.moe(*args, alpha=1.702, limit=7.0, int8_activations=True)
    assert not np.array_equal(got, exact)  # the integer kernels ran
    assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact ** 2)) < 0.02
    assert np.abs(got - exact).max() < 0.03 * np.abs(exact).max()


def decode_row_dots(lanes: int):
    """A function (w, X, out): out[r] = MXFP4 row r of w · X[r], each X[r] quantized for the decode row dot, by a
    row dot built now (with the module's settings as they are)."""
    row_dot = int8.mxfp4_row_dot(lanes)

    @njit
    def dots(w, X, out):
        n_blocks = X.shape[1] // 32
        slots = int8.vector_slots(n_blocks, lanes, int8.MXFP4_BLOCK_LANES)
        for r in range(w.shape[0]):
            xq, xs, xc = np.empty(X.shape[1], np.int8), np.empty(slots, np.float32), np.empty(slots, np.int32)
            int8.quantize_vector(X[r], lanes, int8.MXFP4_OFFSET, int8.MXFP4_BLOCK_LANES, xq, xs, xc)
            out[r] = row_dot(w[r], xq, xs, xc, n_blocks)
    return dots


@pytest.mark.parametrize("vbmi", [False, True])
@pytest.mark.parametrize("lanes", [8, 16])
def test_decode_row_dot_takes_every_scale_byte(lanes, vbmi, monkeypatch):
    """Row e has every block scaled by 2^(e - 128), for each e8m0 byte 0..255 (2^-128 and 2^-127 are subnormal
    floats): its input scaled so that the product stays a normal float32, the row dot is the product of the
    quantized values to float32 rounding (of the blocks' magnitudes: their sums cancel). 11 blocks: two whole steps
    of 16 lanes, a half step and a block past them; five of 8 lanes and a block. With and without AVX-512 VBMI's
    byte permutes for the codes."""
    if lanes == 16 and int8.decode_lanes() != 16:
        pytest.skip("no AVX-512")
    if vbmi and not int8._cpu_features().get("avx512vbmi"):
        pytest.skip("no AVX-512 VBMI")
    monkeypatch.setattr(int8, "VBMI", vbmi)
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (256, 11, 17), dtype=np.uint8)
    blocks[..., 0] = np.arange(256, dtype=np.uint8)[:, None]
    w = Tensor("w", T.MXFP4, (256, 11 * 32), blocks.reshape(256, -1))
    X = rng.standard_normal((256, 11 * 32)) * np.exp2(np.clip(100 - np.arange(256), -20, 100))[:, None]
    X = X.astype(np.float32)
    got = np.empty(256, dtype=np.float32)
    decode_row_dots(lanes)(w.data, X, got)
    row = lambda e: SimpleNamespace(data=w.data[None, e:e + 1], shape=(1, 1, 11 * 32))  # noqa: E731
    want = np.array([int8_dot(row(e), 0, X[e])[0] for e in range(256)])
    magnitude = np.array([int8_dot(row(e), 0, X[e], np.abs)[0] for e in range(256)])
    assert np.isfinite(got).all() and (magnitude > 0).all()
    assert (np.abs(got - want) <= 1e-6 * magnitude).all()


@njit(cache=True)
def quantize_rows(X, xq, xs, xc):
    for t in range(X.shape[0]):
        int8.quantize_row(X[t], int8.MXFP4_OFFSET, xq[t], xs[t], xc[t])


@njit(cache=True)
def row_lanes_all(w, xq, xs, xc, vectors, first, count, lanes, out):
    for r0 in range(0, w.shape[0], lanes):
        int8.row_lanes_mxfp4(w, r0, xq, xs, xc, vectors, first, count, lanes, out)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("rows, count", [(40, 1), (40, 7), (16, 3), (8, 20)])  # 40: a tile past the last row
def test_row_lanes_is_the_exact_product_of_the_quantized_values(lanes, rows, count):
    """Rows in the lanes: tokens vectors[first + i] against every row, into output rows first + i and nowhere else,
    equal to a float64 product of the quantized activations and the dequantized weights to float32 precision."""
    if lanes == 16 and int8.DOT4 != "avx512vnni":
        pytest.skip("16 lanes need AVX-512")
    rng = np.random.default_rng(rows + count)
    w = make_tensor(rng.standard_normal((rows, 2880)) * 2, T.MXFP4)
    # Rows with every block's scale 2^-128 or 2^-127 (denormals), 2^-126, 2^0 and 2^32: the scales' edge cases
    w.data.reshape(rows, 90, 17)[:5, :, 0] = np.array([0, 1, 2, 128, 160])[:, None]
    X = (rng.standard_normal((count, 2880)) * 3).astype(np.float32)
    xq = np.empty(X.shape, dtype=np.int8)
    xs, xc = np.empty((count, 90), dtype=np.float32), np.empty((count, 90), dtype=np.int32)
    quantize_rows(X, xq, xs, xc)
    q, d = quantized(X)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(xs, d)
    np.testing.assert_array_equal(xc, -12 * q.reshape(count, 90, 32).astype(np.int32).sum(axis=-1))
    vectors = np.concatenate([[7, 7], rng.permutation(count)]).astype(np.int64)  # assignments 2, 3, ... → tokens
    out = np.full((count + 3, -(-rows // lanes) * lanes), np.nan, dtype=np.float32)
    row_lanes_all(w.data, xq, xs, xc, vectors, 2, count, lanes, out)
    Xq = (q.reshape(count, -1, 32) * d[..., None].astype(np.float64)).reshape(X.shape)
    expect = Xq[vectors[2:]] @ dequantized(w).T
    # Each row (output column) to float32 precision of its own largest value.
    assert (np.abs(out[2:2 + count, :rows] - expect) <= 1e-5 * np.abs(expect).max(axis=0)).all()
    assert np.isnan(out[:2]).all() and np.isnan(out[2 + count:]).all()


@pytest.mark.parametrize("n_tokens", [13, 70])  # 8 and 16 tokens a vector
def test_moe_takes_all_experts_in_one_pass_as_if_one_by_one(n_tokens):
    """The integer MoE sorts the tokens by expert and runs every expert in one pass a matrix, tiles of rows against
    all of an expert's tokens (`int8.row_lanes_mxfp4`): the same as quantizing and multiplying each expert's tokens
    on their own, through the panels. Experts with one token and with more than a vector's width of them."""
    rng = np.random.default_rng(n_tokens)
    E, I, H, k = 6, 96, 64, 2
    gate, up = (make_tensor(rng.standard_normal((E, I, H)), T.MXFP4, name) for name in ("gate", "up"))
    down = make_tensor(rng.standard_normal((E, H, I)), T.MXFP4, "down")
    gate_b, up_b, down_b = (rng.standard_normal(s).astype(np.float32) for s in ((E, I), (E, I), (E, H)))
    X = rng.standard_normal((n_tokens, H)).astype(np.float32)
    ids = np.stack([rng.choice(5, size=k, replace=False, p=[0.5, 0.3, 0.1, 0.06, 0.04]) for _ in range(n_tokens)])
    ids[0, 1] = 5  # expert 5: one token
    weights = rng.dirichlet([1, 1], n_tokens).astype(np.float32)
    got = kernels.moe(gate, up, down, gate_b, up_b, down_b, X, ids, weights, alpha=1.702, limit=7.0,
                      dense_min_tokens=1, int8_activations=True)
    want = np.zeros_like(X)
    for e in range(E):
        assigned = np.flatnonzero(ids.reshape(-1) == e)
        rows = assigned // k
        panel = int8.Panel(X[rows], T.MXFP4)
        g, u = (int8.matmul(w.data[e], panel) + b[e] for w, b in ((gate, gate_b), (up, up_b)))
        g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
        act = (g / (1 + np.exp(-1.702 * g)) * (u + 1)).astype(np.float32)
        y = int8.matmul(down.data[e], int8.Panel(act, T.MXFP4))
        want[rows] += weights.reshape(-1)[assigned, None] * (y + down_b[e])
    assert np.bincount(ids.reshape(-1), minlength=E)[5] == 1
    # The same up to a rounding of SwiGLU's exp that may move one quantized activation by one step.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def relative_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per position: the largest logit error over the range of the reference's logits."""
    return np.abs(got - want).max(axis=-1) / (want.max(axis=-1) - want.min(axis=-1))


def test_model_error_is_no_larger_than_the_q8_0_files_own(tiny_gguf):
    """The tolerance of the whole forward pass, on a teacher-forced greedy text of 300 positions (100 prompt
    tokens, 200 generated by the float32 reference): 8-bit activations move the logits about as much as the
    default q8_0 file's rounding of the weights does (both against an f32 file; measured on this random tiny
    model, whose logits are nearly flat: median 0.5-0.6 % of the logits' range for both, top token the same at
    96-99 % of positions for int8, 95-96 % for q8_0 weights)."""
    load = lambda outtype, int8_activations: ossrt.load(  # noqa: E731
        tiny_gguf(outtype), context_length=512, threads=2, kv_type="f32", int8_activations=int8_activations)
    with load("f32", False) as reference, load("q8_0", False) as q8_0, load("q8_0", True) as fast:
        prompt = [int(t) for t in np.random.default_rng(5).integers(0, 199998, 100)]
        text = prompt + list(reference.generate(prompt, max_tokens=200, temperature=0, stop_tokens=()))
        want, weights_error = reference.logits(text), q8_0.logits(text)
        got = fast.logits(text)
    assert not np.array_equal(got, weights_error)  # the integer kernels ran
    int8_rel, q8_rel = relative_error(got, want), relative_error(weights_error, want)
    assert np.median(int8_rel) < 1.5 * np.median(q8_rel) and np.median(int8_rel) < 0.01
    agree = lambda logits: (logits.argmax(-1) == want.argmax(-1)).mean()  # noqa: E731
    assert agree(got) > agree(weights_error) - 0.03 and agree(got) > 0.9


# --- decode: the MoE's experts on 8-bit activations -------------------------------------------------------------
def random_experts(rng, E: int, I: int, H: int) -> tuple:
    """MXFP4 gate/up (E, I, H) and down (E, H, I) of random codes, with scales that keep gate·x and up·x of a
    unit-Gaussian x of the order of SwiGLU's limit, and float32 biases: built from bytes, not by quantizing floats,
    so the 20b's sizes are quick."""
    def experts(name, rows, n):
        blocks = rng.integers(0, 256, (E, rows, n // 32, 17), dtype=np.uint8)
        base = 128 + round(np.log2(2 / (6 * np.sqrt(n))))  # values ×2 reach 12, about 6 on average
        blocks[..., 0] = rng.integers(base - 2, base + 3, blocks.shape[:-1])
        return Tensor(name, T.MXFP4, (E, rows, n), blocks.reshape(E, rows, -1))

    biases = [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in ((E, I), (E, I), (E, H))]
    return experts("gate", I, H), experts("up", I, H), experts("down", H, I), *biases


def int8_dot(w, e: int, x: np.ndarray, of_block=lambda sums: sums) -> np.ndarray:
    """Expert e's rows of MXFP4 `w` times x quantized by the rule: every block's products summed exactly as
    integers (E2M1 values ×2 against the int8 values), then scaled by 2^(e8m0 - 128) · x's scale, in float64
    (`of_block`: a function of each block's sum first, e.g. np.abs for the magnitude of the terms)."""
    blocks = w.data[e].reshape(w.shape[1], -1, 17)
    codes = np.concatenate([blocks[..., 1:] & 15, blocks[..., 1:] >> 4], axis=-1)
    q, d = quantized(x[None])
    sums = np.einsum("rbj,bj->rb", mxfp4.KVALUES[codes].astype(np.int32), q.reshape(-1, 32).astype(np.int32))
    return (of_block(sums) * np.ldexp(1.0, blocks[..., 0].astype(np.int64) - 128) * d[0].astype(np.float64)).sum(-1)


def int8_moe_reference(gate, up, down, gate_b, up_b, down_b, X, ids, weights) -> tuple[np.ndarray, np.ndarray]:
    """The MoE with both matrix inputs quantized (`int8_dot`), in float64: the output, and how far from it the
    kernel may be beyond rounding: a SwiGLU output within 0.001 of a rounding boundary of its quantization (the
    kernel's float32 sums differ from these in the last bits) may fall one step either way, moving the output by
    its scale times the down column it meets."""
    out, slack = np.zeros(X.shape), np.zeros(X.shape)
    for t in range(len(X)):
        for e, weight in zip(ids[t], weights[t]):
            g = np.minimum(int8_dot(gate, e, X[t]) + gate_b[e], 7.0)
            u = np.clip(int8_dot(up, e, X[t]) + up_b[e], -7.0, 7.0)
            act = (g / (1 + np.exp(-1.702 * g)) * (u + 1)).astype(np.float32)
            out[t] += weight * (int8_dot(down, e, act) + down_b[e])
            d = np.repeat(quantized(act[None])[1][0], 32)
            steps = np.abs(act) / np.where(d > 0, d, 1)
            near = np.abs(steps - np.floor(steps) - 0.5) < 1e-3
            slack[t] += weight * np.abs(mxfp4.dequantize_gguf(down.data[e])) @ (near * d)
    return out, slack


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("E, I, H, ids", [
    (4, 64, 96, [[3, 1]]),  # 3 blocks: all past the whole steps of 16 lanes, one past them with 8
    (6, 160, 224, [[5, 2, 3, 0]]),  # 5 and 7 blocks
    (3, 2880, 2880, [[2, 1]]),  # the 20b's: 90 blocks
    (5, 96, 128, [[4, 1], [2, 4], [0, 3]]),  # three tokens, all through the fused kernel (a prefill's lone ones)
    (4, 160, 224, [[1, 0]] * 6 + [[1, 2]] * 3 + [[3, 1]]),  # experts with 10, 6, 3 and 1 of ten tokens
])
def test_decode_moe_is_the_exact_product_of_the_quantized_values(monkeypatch, lanes, E, I, H, ids):
    """The decode MoE with int8 activations equals the NumPy product of the same quantized vectors (integer sums
    exact) to float32 rounding, with both row dot widths (8 lanes: AVX-VNNI CPUs)."""
    if lanes == 16 and int8.DOT4 != "avx512vnni":
        pytest.skip("16 lanes need AVX-512")
    monkeypatch.setattr(int8, "DOT4", "avx512vnni" if lanes == 16 else "avxvnni")
    assert int8.decode_lanes() == lanes
    rng = np.random.default_rng(H)
    experts = random_experts(rng, E, I, H)
    ids = np.array(ids)
    X = rng.standard_normal((len(ids), H)).astype(np.float32)
    weights = rng.dirichlet(np.ones(ids.shape[1]), len(ids)).astype(np.float32)
    got = kernels.moe(*experts, X, ids, weights, alpha=1.702, limit=7.0, dense_min_tokens=10**9,
                      int8_activations=True)
    want, slack = int8_moe_reference(*experts, X, ids, weights)
    assert got.dtype == np.float32 and got.shape == X.shape
    assert slack.max() < 0.005 * np.abs(want).max()  # few SwiGLU outputs near a boundary: 0-0.3 % here
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * np.abs(want).max() + 1.001 * slack)


def test_decode_moe_error_against_float32():
    """The error 8-bit activations add to the decode MoE (two quantized matrix inputs in a row, the second
    SwiGLU's heavy-tailed output), at the 20b's sizes over 8 tokens: an RMS error of about 1 % of the outputs',
    as in prefill (measured: 1.0 %, the largest 1.2 % of the largest output; 1.1 % and 1.0 % with Gaussian
    weights quantized to MXFP4), and unbiased. With int8_activations=False it is the float32 kernel, bit for
    bit."""
    rng = np.random.default_rng(7)
    E, I, H, T_ = 4, 2880, 2880, 8
    gate, up, down, gate_b, up_b, down_b = random_experts(rng, E, I, H)
    X = rng.standard_normal((T_, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:2] for _ in range(T_)])
    weights = rng.dirichlet([1, 1], T_).astype(np.float32)
    args = (gate, up, down, gate_b, up_b, down_b, X, ids, weights)
    exact = kernels.moe(*args, alpha=1.702, limit=7.0, dense_min_tokens=10**9)
    got = kernels.moe(*args, alpha=1.702, limit=7.0, dense_min_tokens=10**9, int8_activations=True)
    err = got - exact
    assert 0 < np.abs(err).max() < 0.02 * np.abs(exact).max()
    assert np.sqrt(np.mean(err ** 2) / np.mean(exact ** 2)) < 0.02
    assert abs(err.mean()) < 0.02 * err.std()
    float32 = np.zeros_like(X)
    assert kernels._moe_assignments(X, ids, weights, np.arange(2 * T_), gate.data, up.data, down.data, gate_b, up_b,
                                    down_b, np.float32(1.702), np.float32(7.0), 0, float32)
    assert exact.tobytes() == float32.tobytes()


def test_decode_moe_without_vnni_is_float32(monkeypatch):
    """A CPU without VNNI (`DOT4` None) keeps the float32 kernel, whatever int8_activations says."""
    rng = np.random.default_rng(8)
    experts = random_experts(rng, 4, 64, 96)
    X = rng.standard_normal((1, 96)).astype(np.float32)
    ids, weights = np.array([[2, 0]]), np.array([[0.7, 0.3]], dtype=np.float32)
    exact = kernels.moe(*experts, X, ids, weights, alpha=1.702, limit=7.0)
    assert not np.array_equal(kernels.moe(*experts, X, ids, weights, alpha=1.702, limit=7.0,
                                          int8_activations=True), exact)
    monkeypatch.setattr(int8, "DOT4", None)
    assert kernels.moe(*experts, X, ids, weights, alpha=1.702, limit=7.0, int8_activations=True).tobytes() == \
        exact.tobytes()


def test_decode_moe_of_non_finite_activations_is_non_finite():
    rng = np.random.default_rng(9)
    experts = random_experts(rng, 4, 64, 96)
    X = rng.standard_normal((2, 96)).astype(np.float32)
    X[1, 40] = np.inf
    out = kernels.moe(*experts, X, np.array([[1, 2], [3, 0]]), np.full((2, 2), 0.5, dtype=np.float32), alpha=1.702,
                      limit=7.0, dense_min_tokens=10**9, int8_activations=True)
    assert np.isfinite(out[0]).all() and not np.isfinite(out[1]).any()


# --- decode: Q8_0 matrices (attention projections, unembedding) on 8-bit activations --------------------------------
def int8_q8_0_dot(w, x: np.ndarray) -> np.ndarray:
    """The rows of Q8_0 `w` times x quantized by the rule: every block's int8 products summed exactly as integers,
    then scaled by the block's f16 scale · x's scale, in float64."""
    blocks = w.data.reshape(w.shape[0], -1, 34)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    q, d = quantized(x[None])
    sums = np.einsum("rbj,bj->rb", blocks[..., 2:].view(np.int8).astype(np.int32),
                     q.reshape(-1, 32).astype(np.int32))
    return (sums * scales * d[0].astype(np.float64)).sum(axis=-1)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("rows, n", [(3, 32), (37, 96), (20, 160), (300, 2880), (64, 4096)])  # 1, 3, 5 blocks: tails
def test_decode_q8_0_is_the_exact_product_of_the_quantized_values(monkeypatch, lanes, rows, n):
    """One token's Q8_0 linear with int8 activations, alone and fused with others (`linear_many`: the q/k/v
    projections), equals the NumPy product of the same quantized vector (integer sums exact) to float32 rounding,
    with both row dot widths: 16 lanes take two blocks a step, 8 lanes (AVX-VNNI CPUs) one; odd block counts leave
    one block for the tail loop."""
    if lanes == 16 and int8.DOT4 != "avx512vnni":
        pytest.skip("16 lanes need AVX-512")
    monkeypatch.setattr(int8, "DOT4", "avx512vnni" if lanes == 16 else "avxvnni")
    assert int8.decode_lanes() == lanes
    rng = np.random.default_rng(rows + n)
    ws = [make_tensor(rng.standard_normal((r, n)) * 2, T.Q8_0, f"w{r}") for r in (rows, 2 * rows + 1, 5)]
    x = (rng.standard_normal((1, n)) * 3).astype(np.float32)
    got = kernels.linear(ws[0], x, int8_activations=True)
    fused = kernels.linear_many(ws, x, int8_activations=True)
    assert got.shape == (1, rows) and got.dtype == np.float32
    for w, y in zip(ws, fused):
        want = int8_q8_0_dot(w, x[0])
        np.testing.assert_allclose(y[0], want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert got.tobytes() == fused[0].tobytes()


def test_decode_q8_0_error_against_float32():
    """The error 8-bit activations add to one token's Q8_0 linear, Gaussian weights and inputs at the 20b's width
    over 16 tokens: below 1 % of the largest output (measured: 0.54 %; RMS 0.54 % of the outputs'), and unbiased
(mean 0.002 of the standard deviation).
    With int8_activations=False it is the float32 decode kernel, bit for bit, alone and fused."""
    rng = np.random.default_rng(11)
    ws = [make_tensor(rng.standard_normal((rows, 2880)), T.Q8_0, f"w{rows}") for rows in (2048, 256, 256)]
    X = rng.standard_normal((16, 2880)).astype(np.float32)
    exact = np.concatenate([kernels.linear(ws[0], x[None]) for x in X])
    got = np.concatenate([kernels.linear(ws[0], x[None], int8_activations=True) for x in X])
    err = got - exact
    assert 0 < np.abs(err).max() < 0.01 * np.abs(exact).max()
    assert np.sqrt(np.mean(err ** 2) / np.mean(exact ** 2)) < 0.01
    assert abs(err.mean()) < 0.02 * err.std()
    float32 = np.empty((1, 2048), dtype=np.float32)
    kernels._matvec_q8_0(ws[0].data, X[:1], np.zeros(2048, np.float32), float32)
    assert exact[:1].tobytes() == float32.tobytes()
    first_row = np.array([0, 2048, 2304, 2560])
    fused = np.empty((1, 2560), dtype=np.float32)
    no_bias = tuple(np.zeros(w.shape[0], np.float32) for w in ws)
    kernels._matvecs_q8_0(tuple(w.data for w in ws), first_row, X[:1], no_bias, fused)
    assert np.concatenate(kernels.linear_many(ws, X[:1], int8_activations=False), axis=1).tobytes() == \
        fused.tobytes()


def test_decode_linear_stays_float32_without_vnni_or_off_q8_0(monkeypatch):
    """A CPU without VNNI (`DOT4` None) keeps the float32 kernels for Q8_0 matrices, whatever int8_activations
    says; matrices of other types (the router's, BF16 files' projections) keep them on any CPU."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    other = [make_tensor(rng.standard_normal((40, 96)), qtype) for qtype in (T.F32, T.BF16, T.F16, T.MXFP4)]
    for w in other:
        assert kernels.linear(w, x, int8_activations=True).tobytes() == kernels.linear(w, x).tobytes()
    bf16 = other[1:2] * 2
    assert [y.tobytes() for y in kernels.linear_many(bf16, x, int8_activations=True)] == \
        [y.tobytes() for y in kernels.linear_many(bf16, x)]
    ws = [make_tensor(rng.standard_normal((rows, 96)), T.Q8_0) for rows in (40, 8)]
    exact, exact_many = kernels.linear(ws[0], x), kernels.linear_many(ws, x)
    assert kernels.linear(ws[0], x, int8_activations=True).tobytes() != exact.tobytes()
    monkeypatch.setattr(int8, "DOT4", None)
    assert kernels.linear(ws[0], x, int8_activations=True).tobytes() == exact.tobytes()
    assert [y.tobytes() for y in kernels.linear_many(ws, x, int8_activations=True)] == \
        [y.tobytes() for y in exact_many]


def test_decode_q8_0_of_non_finite_activations_is_non_finite():
    """A NaN or inf anywhere in the vector makes every output non-finite, as in float32: its block's scale is
    NaN, whether the block falls in a whole step or in the tail."""
    rng = np.random.default_rng(13)
    ws = [make_tensor(rng.standard_normal((rows, 160)), T.Q8_0) for rows in (24, 8)]
    for at, value in ((5, np.nan), (70, np.inf), (150, -np.inf)):  # blocks 0 and 2 (whole steps), 4 (the tail)
        x = rng.standard_normal((1, 160)).astype(np.float32)
        x[0, at] = value
        assert not np.isfinite(kernels.linear(ws[0], x, int8_activations=True)).any()
        assert not any(np.isfinite(y).any() for y in kernels.linear_many(ws, x, int8_activations=True))


def decode_logits(model, text: list[int], start: int) -> np.ndarray:
    """The logits of decoding text[start:] one token a step after a prefill of text[:start] (teacher-forced):
    row i predicts text[start + i + 1]."""
    cache = model.engine.new_cache()
    model.engine.forward(np.array(text[:start]), cache)
    return np.concatenate([model.engine.forward(np.array([token]), cache) for token in text[start:-1]])


def test_decode_error_is_no_larger_than_the_q8_0_files_own(tiny_gguf):
    """Decode on 8-bit activations (the MoE's experts, the Q8_0 attention projections and unembedding),
    teacher-forced over a greedy text of 200 tokens that the float32 reference (f32 file) generated after a
    100-token prompt: its logits move about as much as the q8_0 file's rounding of the weights moves them
    (measured on this random tiny model, whose logits are nearly flat, hidden 160 and expert width 96 so both whole
    steps and single blocks of the row dots run, q8_0 file: median error 1.08 % of the logits' range with int8
    activations, 1.00 % with only the experts' (before the Q8_0 row dots), 0.71 % without; top token the
    reference's at 89.4 %, 89.4 % and 94.5 % of the 199 steps). 91.5 % before the activations' quantizer stopped
    inheriting fastmath from its callers (x / d as x · (1 / d)), 89.9 % before the decode MoE wrote its down rows'
    sums before adding them up: a few near ties of this nearly flat model's logits fall either way, so the floors
    are 85 % and 6 points below the q8_0 file's."""
    sizes = dict(hidden_size=160, intermediate_size=96)
    load = lambda outtype, int8_activations: ossrt.load(  # noqa: E731
        tiny_gguf(outtype, **sizes), context_length=512, threads=2, kv_type="f32", int8_activations=int8_activations)
    with load("f32", False) as reference, load("q8_0", False) as q8_0, load("q8_0", True) as fast:
        transformer = fast.engine.transformer
        assert {transformer.output.type, transformer.layers[0]["attn_q.weight"].type} == {T.Q8_0}
        prompt = [int(t) for t in np.random.default_rng(6).integers(0, 199998, 100)]
        text = prompt + list(reference.generate(prompt, max_tokens=200, temperature=0, stop_tokens=()))
        want, weights_error, got = (decode_logits(m, text, len(prompt)) for m in (reference, q8_0, fast))
    assert not np.array_equal(got, weights_error)  # the integer kernels ran
    int8_rel, q8_rel = relative_error(got, want), relative_error(weights_error, want)
    agree = lambda logits: (logits.argmax(-1) == want.argmax(-1)).mean()  # noqa: E731
    assert np.median(int8_rel) < 2 * np.median(q8_rel) and np.median(int8_rel) < 0.015
    assert agree(got) > agree(weights_error) - 0.06 and agree(got) > 0.85


def test_load_rejects_a_non_bool(tiny_gguf):
    with pytest.raises(ParameterError, match="int8_activations must be True or False, got 'no'"):
        ossrt.load(tiny_gguf(), int8_activations="no")
