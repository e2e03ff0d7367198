"""The kernels with 8-bit activations (`engine.int8`) against the float32 ones, side by side in one process: the
prefill matmul on the 20b's square 2880 × 2880 matrices (an expert's gate/up/down, the attention projections'
width) for several token counts, the prefill MoE (one layer of the 20b's 32 experts, each token routed to 4 at
random, so a 60-token prompt gives each expert about 7.5 tokens), then the decode MoE (one token, 4 of 32 experts of the 20b's size, different
experts each call so they come from memory, not cache), then decode's Q8_0 matrix-vector products at the 20b's
shapes (the fused q/k/v projections, the attention output, the unembedding; the projections of 12 layers in turn so
they come from memory too).

    python benchmarks/bench_int8.py [--threads 2] [--rows 2880] [--decode-only | --prefill-moe-only]

Prints GFLOP/s (2 · rows · 2880 · tokens per second, best of 5) for each weight type and token count: float32,
int8 with the activations' quantization (what a prefill pays), and their ratio; for the prefill MoE, ms a layer
(median of float32 and int8 calls alternating) and the int8 GMAC/s; for the decode MoE and matvecs, ms a call
(median, float32 and int8 calls alternating) and the GB/s of weights they stream.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import quants

from ossrt.engine import int8, kernels
from ossrt.format import mxfp4
from ossrt.format.modelfile import Tensor

N_EMBD = 2880
TOKENS = (4, 8, 16, 64, 256, 512)


def best_seconds(f, repeats: int = 5) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=N_EMBD)
    ap.add_argument("--decode-only", action="store_true", help="only the decode MoE and matrix-vector products")
    ap.add_argument("--prefill-moe-only", action="store_true", help="only the prefill MoE")
    args = ap.parse_args()
    kernels.set_num_threads(args.threads)
    if int8.DOT4 is None:
        raise SystemExit("this CPU has no VNNI: activations stay float32, nothing to compare")
    rng = np.random.default_rng(0)
    if args.decode_only:
        decode_moe(rng)
        return decode_q8_0(rng)
    if args.prefill_moe_only:
        return prefill_moe(rng)
    dense = rng.standard_normal((args.rows, N_EMBD)).astype(np.float32)
    print(f"# {args.rows} x {N_EMBD} weights, {args.threads} threads, int8 kernels: {int8.DOT4}")
    print(f"{'weights':8}{'tokens':>7}{'float32 GFLOP/s':>17}{'int8 GFLOP/s':>14}{'ratio':>7}")
    packed = {GGMLType.MXFP4: mxfp4.quantize_gguf(dense), GGMLType.Q8_0: quants.quantize(dense, GGMLType.Q8_0)}
    for qtype, data in packed.items():
        w = Tensor("w", qtype, dense.shape, data)
        for n in TOKENS:
            X = rng.standard_normal((n, N_EMBD)).astype(np.float32)
            flops = 2 * args.rows * N_EMBD * n
            f32 = best_seconds(lambda: kernels.matmul(w, X))
            i8 = best_seconds(lambda: kernels.matmul(w, X, int8_activations=True))
            print(f"{qtype.name:8}{n:>7}{flops / f32 / 1e9:>17.0f}{flops / i8 / 1e9:>14.0f}{f32 / i8:>6.2f}x")
    prefill_moe(rng)
    decode_moe(rng)
    decode_q8_0(rng)


def alternating(calls: int, f32, i8) -> tuple[float, float]:
    """Median seconds of f32() and i8(), called alternately `calls` times each after one call of each."""
    seconds = {f32: [], i8: []}
    for call in range(calls + 1):
        for f in (f32, i8):
            t0 = time.perf_counter()
            f()
            if call:  # the first call compiles
                seconds[f].append(time.perf_counter() - t0)
    return float(np.median(seconds[f32])), float(np.median(seconds[i8]))


def random_q8_0(rng, rows: int, n: int) -> Tensor:
    """A Q8_0 matrix of random values with scales near 0.01."""
    blocks = rng.integers(0, 256, (rows, n // 32, 34), dtype=np.uint8)
    blocks[..., :2] = rng.uniform(0.005, 0.015, (rows, n // 32, 1)).astype(np.float16).view(np.uint8)
    return Tensor("w", GGMLType.Q8_0, (rows, n), blocks.reshape(rows, -1))


def decode_q8_0(rng, layers: int = 12, calls: int = 24) -> None:
    """Decode's Q8_0 matrix-vector products of the 20b, float32 and int8 alternating: the fused q/k/v projections
    (`linear_many`, 4096 + 512 + 512 rows of 2880) and the attention output (2880 × 4096) of `layers` layers in turn,
    and the 201088 × 2880 unembedding."""
    qkv = [[random_q8_0(rng, rows, N_EMBD) for rows in (4096, 512, 512)] for _ in range(layers)]
    o = [random_q8_0(rng, N_EMBD, 4096) for _ in range(layers)]
    output = random_q8_0(rng, 201088, N_EMBD)
    x, x_o = rng.standard_normal((1, N_EMBD)).astype(np.float32), rng.standard_normal((1, 4096)).astype(np.float32)
    print(f"{'decode Q8_0':28}{'float32 ms':>11}{'GB/s':>7}{'int8 ms':>9}{'GB/s':>7}{'ratio':>7}")

    def row(name, weights, f):
        layer = iter(range(1 << 30))
        nbytes = sum(w.nbytes for w in weights)
        f32, i8 = alternating(calls, lambda: f(next(layer), False), lambda: f(next(layer), True))
        print(f"{name:28}{f32 * 1e3:>11.2f}{nbytes / f32 / 1e9:>7.1f}{i8 * 1e3:>9.2f}{nbytes / i8 / 1e9:>7.1f}"
              f"{f32 / i8:>6.2f}x")

    row("q/k/v 5120 x 2880 (fused)", qkv[0],
        lambda i, int8_activations: kernels.linear_many(qkv[i % layers], x, int8_activations=int8_activations))
    row("attn_output 2880 x 4096", o[:1],
        lambda i, int8_activations: kernels.linear(o[i % layers], x_o, int8_activations=int8_activations))
    row("output 201088 x 2880", [output],
        lambda i, int8_activations: kernels.linear(output, x, int8_activations=int8_activations))


def random_experts(rng, E: int) -> list[Tensor]:
    """gate, up, down: E random MXFP4 experts of the 20b's size (scales near 2^-6)."""
    def experts():
        blocks = rng.integers(0, 256, (E, N_EMBD, N_EMBD // 32, 17), dtype=np.uint8)
        blocks[..., 0] = rng.integers(119, 124, blocks.shape[:-1])
        return Tensor("experts", GGMLType.MXFP4, (E, N_EMBD, N_EMBD), blocks.reshape(E, N_EMBD, -1))
    return [experts() for _ in range(3)]


def prefill_moe(rng, E: int = 32, k: int = 4, calls: int = 4) -> None:
    """One MoE layer of the 20b over a prompt, float32 and int8 calls alternating, two layers' experts in turn so
    that they come from memory."""
    layers = [random_experts(rng, E) for _ in range(2)]
    biases = [np.zeros((E, N_EMBD), dtype=np.float32)] * 3
    print(f"{'prefill MoE':12}{'tokens':>7}{'float32 ms':>11}{'int8 ms':>9}{'int8 GMAC/s':>12}{'ratio':>7}")
    for n in (16, 60, 128, 512):
        X = rng.standard_normal((n, N_EMBD)).astype(np.float32)
        ids = np.stack([rng.permutation(E)[:k] for _ in range(n)])
        weights = np.full((n, k), 1 / k, dtype=np.float32)
        layer = iter(range(1 << 30))

        def moe(int8_activations):
            kernels.moe(*layers[next(layer) % 2], *biases, X, ids, weights, alpha=1.702, limit=7.0,
                        int8_activations=int8_activations)
        f32, i8 = alternating(calls, lambda: moe(False), lambda: moe(True))
        macs = 3 * n * k * N_EMBD * N_EMBD
        print(f"{'':12}{n:>7}{f32 * 1e3:>11.1f}{i8 * 1e3:>9.1f}{macs / i8 / 1e9:>12.0f}{f32 / i8:>6.2f}x")


def decode_moe(rng, E: int = 32, k: int = 4, calls: int = 20) -> None:
    """The fused decode MoE, float32 and int8 calls alternating, on random MXFP4 experts of the 20b's size."""
    gate, up, down = random_experts(rng, E)
    biases = [np.zeros((E, N_EMBD), dtype=np.float32)] * 3
    x = rng.standard_normal((1, N_EMBD)).astype(np.float32)
    weights = np.full((1, k), 1 / k, dtype=np.float32)
    nbytes = k * (gate.nbytes + up.nbytes + down.nbytes) / E
    seconds = {False: [], True: []}
    for call in range(calls + 1):
        ids = rng.permutation(E)[None, :k]
        for int8_activations in (False, True):
            t0 = time.perf_counter()
            kernels.moe(gate, up, down, *biases, x, ids, weights, alpha=1.702, limit=7.0,
                        int8_activations=int8_activations)
            if call:  # the first call compiles
                seconds[int8_activations].append(time.perf_counter() - t0)
    f32, i8 = (float(np.median(seconds[key])) for key in (False, True))
    print(f"decode MoE ({k} of {E} experts, {nbytes / 1e6:.0f} MB): float32 {f32 * 1e3:.2f} ms "
          f"{nbytes / f32 / 1e9:.1f} GB/s, int8 {i8 * 1e3:.2f} ms {nbytes / i8 / 1e9:.1f} GB/s, {f32 / i8:.2f}x")


if __name__ == "__main__":
    main()
