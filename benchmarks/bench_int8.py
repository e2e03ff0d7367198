"""The prefill matmul with 8-bit activations (`engine.int8`) against the float32 one, side by side in one process,
on the 20b's square 2880 × 2880 matrices (an expert's gate/up/down, the attention projections' width) for several
token counts.

    python benchmarks/bench_int8.py [--threads 2] [--rows 2880]

Prints GFLOP/s (2 · rows · 2880 · tokens per second, best of 5) for each weight type and token count: float32,
int8 with the activations' quantization (what a prefill pays), and their ratio.
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
    args = ap.parse_args()
    kernels.set_num_threads(args.threads)
    if int8.DOT4 is None:
        raise SystemExit("this CPU has no VNNI: prefill stays float32, nothing to compare")
    rng = np.random.default_rng(0)
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


if __name__ == "__main__":
    main()
