"""Attention with sinks over the KV cache, one layer of the 20b's shapes (64 query heads, 8 KV heads, head size 64):
milliseconds and multiply-adds a second for a prompt's chunks and for decode at growing context lengths.

    python benchmarks/bench_attention.py [--threads 2] [--kv-type f16] [--rounds 5]

The cache holds random keys and values stored as `kv_type`; each case is timed `rounds` times after a warm-up (the
median is printed). Multiply-adds count the scores and the values' weighted sums: 2 · d a visible position.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from ossrt.defaults import KV_TYPES
from ossrt.engine.attention import attend
from ossrt.engine.kv_cache import CHUNK, LayerKV

N_HEAD, N_KV, D, SLIDING_WINDOW = 64, 8, 64, 128

# (label, context filled before, new positions, window)
CASES = [
    ("prefill: first 512 positions, full layer", 0, 512, 4096),
    ("prefill: positions 1,536-2,048, full layer", 1536, 512, 4096),
    ("prefill: 512 positions, sliding layer", 1536, 512, SLIDING_WINDOW),
    ("prefill: 60-token prompt, full layer", 0, 60, 4096),
    ("decode at 128 positions, full layer", 127, 1, 4096),
    ("decode at 2,000 positions, full layer", 1999, 1, 4096),
    ("decode at 8,000 positions, full layer", 7999, 1, 8192),
    ("decode, sliding layer", 1999, 1, SLIDING_WINDOW),
]


def run_case(start: int, T: int, window: int, kv_type: str, rounds: int) -> tuple[float, int]:
    """Median seconds of `attend` for T queries at positions start.. and the multiply-adds it does."""
    rng = np.random.default_rng(0)
    capacity = min(window + CHUNK - 1, start + T)  # a sliding layer's ring, or every position
    kv = LayerKV(N_KV, capacity, D, kv_type, window)
    for s in range(0, start + T, CHUNK):
        n = min(CHUNK, start + T - s)
        kv.store(s, rng.standard_normal((n, N_KV, D), dtype=np.float32),
                 rng.standard_normal((n, N_KV, D), dtype=np.float32))
    q = rng.standard_normal((T, N_HEAD, D), dtype=np.float32)
    sinks = rng.standard_normal(N_HEAD, dtype=np.float32)
    attend(q, kv, start, sinks, D ** -0.5)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        attend(q, kv, start, sinks, D ** -0.5)
        times.append(time.perf_counter() - t0)
    visible = sum(min(start + t + 1, window) for t in range(T))
    return statistics.median(times), 2 * D * N_HEAD * visible


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--kv-type", choices=KV_TYPES, default="f16")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    print(f"# attention, {N_HEAD} query heads, {N_KV} KV heads, head size {D}, {args.kv_type} cache, "
          f"{args.threads} threads, median of {args.rounds}")
    print(f"{'case':45s} {'ms':>9s} {'GMAC/s':>8s}")
    for label, start, T, window in CASES:
        seconds, macs = run_case(start, T, window, args.kv_type, args.rounds)
        print(f"{label:45s} {seconds * 1e3:9.3f} {macs / seconds / 1e9:8.1f}")


if __name__ == "__main__":
    main()
