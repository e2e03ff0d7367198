"""Where a decode token's time goes: every operation of the forward pass timed over a run of decode steps, with
the bytes of weights each one reads and the rate it reads them at, beside the machine's read bandwidth over the
same mapped file measured in the same run.

    python benchmarks/profile_decode.py MODEL.gguf [--threads 2] [--prompt 128] [--decode 32] [--no-int8]

`--no-int8` loads with `int8_activations=False`: float32 throughout, where the default runs the MoE's experts (and
the prompt's matmuls) on 8-bit activations on a VNNI CPU. Run both, alternately, to compare them.

Operations are timed by wrapping the CPU backend's methods (the Numba kernels run synchronously, so wall time is
theirs); `linear` is split by weight (attention projections, router, unembedding). "other" is the rest of the token:
Python between operations, residual adds, reshapes.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
from numba import njit, prange

import ossrt
from ossrt.engine import int8


@njit(parallel=True, cache=True, fastmath=True)
def _xor_words(words):
    """Every 8-byte word XORed: each byte is read, in vector registers, with no other work. Sixteen independent
    lanes, so that LLVM vectorizes the loop (one accumulator ran at a quarter of the memory's rate)."""
    chunk = 1 << 16
    n = words.shape[0] // chunk
    partial = np.zeros(n, dtype=np.uint64)
    for c in prange(n):
        acc = np.zeros(16, dtype=np.uint64)
        rows = words[c * chunk:(c + 1) * chunk].reshape(chunk // 16, 16)
        for i in range(rows.shape[0]):
            for j in range(16):
                acc[j] ^= rows[i, j]
        for j in range(16):
            partial[c] ^= acc[j]
    return partial


def read_bandwidth(tensors, passes: int = 2) -> float:
    """GB/s reading `tensors`' mapped bytes through with every thread, the faster of `passes` passes after a first
    that maps every page (on a VM, memory not touched for a while is slow to touch again): the rate a weight stream
    could reach at best."""
    views = [t.data.reshape(-1).view(np.uint8) for t in tensors if t.nbytes >= 8 << 16]
    words = [v[:v.size // 8 * 8].view(np.uint64) for v in views]
    for w in words:
        _xor_words(w)
    fastest = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for w in words:
            _xor_words(w)
        fastest = min(fastest, time.perf_counter() - t0)
    return sum(w.nbytes // (8 << 16) * (8 << 16) for w in words) / fastest / 1e9


def linear_kind(name: str) -> str:
    if name == "output.weight":
        return "linear: unembedding"
    if "ffn_gate_inp" in name:
        return "linear: router"
    return "linear: attention q/k/v/o"


class Profile:
    """Wraps an Ops object's methods: seconds and bytes read per operation."""

    def __init__(self, ops, config):
        self.seconds = collections.Counter()
        self.bytes = collections.Counter()
        self.calls = collections.Counter()
        self.config = config
        for name in ("embed", "rms_norm", "rotation", "rope", "router", "store", "attend"):
            self._wrap(ops, name, lambda *a, name=name: (name, 0))
        self._wrap(ops, "linear", lambda w, x, *rest: (linear_kind(w.name), w.nbytes))
        self._wrap(ops, "linear_many", lambda ws, x, *rest: (linear_kind(ws[0].name), sum(w.nbytes for w in ws)))
        self._wrap(ops, "moe", self._moe_bytes)

    def _moe_bytes(self, gate, up, down, gate_b, up_b, down_b, x, ids, *rest):
        experts = len(np.unique(ids))
        return "moe (fused experts)", experts * (gate.nbytes + up.nbytes + down.nbytes) // gate.shape[0]

    def _wrap(self, ops, name, describe):
        method = getattr(ops, name)

        def timed(*args):
            t0 = time.perf_counter()
            out = method(*args)
            key, nbytes = describe(*args)
            self.seconds[key] += time.perf_counter() - t0
            self.bytes[key] += nbytes
            self.calls[key] += 1
            return out

        setattr(ops, name, timed)


def decode_profiled(tr, prompt: list[int], n: int) -> tuple[Profile, float]:
    """Decode `n` greedy tokens after `prompt` on a fresh cache with every operation of those tokens timed (the
    prompt and a first token run before, so every kernel is compiled and its pages mapped): the profile and the
    seconds the `n` tokens took."""
    cache = tr.new_cache(len(prompt) + n + 8)
    logits = tr.forward(prompt, cache)[-1]
    logits = tr.forward([int(np.argmax(logits))], cache)[-1]
    profile = Profile(tr.ops, tr.config)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = tr.forward([int(np.argmax(logits))], cache)[-1]
    return profile, time.perf_counter() - t0


def print_table(seconds: dict[str, float], nbytes: dict[str, int], n: int, total: float, bandwidth: float) -> None:
    """The per-operation rows of `n` tokens that took `total` seconds, slowest first, then the rest of the time."""
    print(f"{'operation':<28} {'ms/token':>9} {'share':>6} {'MB/token':>9} {'GB/s':>6} {'of bw':>6}")
    for key, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        cells = ""
        if nbytes.get(key):
            rate = nbytes[key] / s / 1e9
            cells = f"{nbytes[key] / n / 1e6:>9.0f} {rate:>6.1f} {rate / bandwidth:>6.0%}"
        print(f"{key:<28} {s / n * 1e3:>9.2f} {s / total:>6.0%} {cells}")
    other = total - sum(seconds.values())
    print(f"{'other (Python, adds, ...)':<28} {other / n * 1e3:>9.2f} {other / total:>6.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-int8", action="store_true", help="float32 activations throughout")
    args = ap.parse_args()

    model = ossrt.load(args.model, context_length=args.prompt + args.decode + 8, threads=args.threads,
                       int8_activations=not args.no_int8)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1000, 199000, args.prompt)]
    profile, total = decode_profiled(model.engine.transformer, prompt, args.decode)
    bandwidth = read_bandwidth(list(model.model_file.tensors.values()))

    n = args.decode
    activations = f"int8 ({int8.DOT4})" if int8.DOT4 and not args.no_int8 else "float32"
    print(f"# {args.model}, {args.threads} threads, {activations} activations, {n} decode tokens after {args.prompt}: "
          f"{n / total:.2f} tok/s, {total / n * 1e3:.1f} ms/token; read bandwidth over the file {bandwidth:.1f} GB/s")
    print_table(profile.seconds, profile.bytes, n, total, bandwidth)
    weights = sum(profile.bytes.values()) / n
    print(f"weights read per token {weights / 1e9:.2f} GB: at the measured bandwidth the token would take "
          f"{weights / bandwidth / 1e6:.1f} ms ({weights / bandwidth / 1e9 / (total / n):.0%} of the time taken)")


if __name__ == "__main__":
    main()
