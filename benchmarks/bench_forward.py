"""Forward-pass speed on a full-size model file: start-up (JIT) time, prefill and decode tokens/s, kernel
throughput, peak RSS.

    python benchmarks/bench_forward.py MODEL.gguf [--threads 2] [--prompt 128] [--decode 16] [--prefill 512]

Start-up is measured in two fresh child processes sharing a new, empty Numba cache directory: the first compiles
every kernel, the second loads them from the cache. Everything else runs in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import ossrt
model = ossrt.load(sys.argv[1], context_length=256, threads=int(sys.argv[2]))
t1 = time.perf_counter()
cache = model.engine.transformer.new_cache(256)
model.engine.transformer.forward([1, 2, 3], cache)   # prefill kernels
model.engine.transformer.forward([4], cache)         # decode kernels
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "first_tokens": t2 - t1}))
"""


def start_times(path: str, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", CHILD, path, str(threads)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        return runs


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=16, help="tokens to decode")
    ap.add_argument("--prefill", type=int, default=512, help="tokens for the prefill measurement (0: skip)")
    args = ap.parse_args()

    first, second = start_times(args.model, args.threads)

    import ossrt
    from ossrt.engine import kernels
    from ossrt.format.modelfile import Tensor

    model = ossrt.load(args.model, context_length=max(args.prompt + args.decode, args.prefill) + 1,
                       threads=args.threads)
    cfg = model.config
    rng = np.random.default_rng(0)
    rows = []

    # Kernel throughput: one MXFP4 tensor (all experts of layer 0's gate as one matrix) and the fused MoE of one
    # token (4 experts: gate, up, down).
    gate = model.model_file.tensors["blk.0.ffn_gate_exps.weight"]
    flat = Tensor(gate.name, gate.type, (gate.shape[0] * gate.shape[1], gate.shape[2]),
                  gate.data.reshape(-1, gate.data.shape[-1]))
    x = rng.standard_normal(cfg.n_embd).astype(np.float32)
    kernels.matvec(flat, x)
    t = timed(lambda: kernels.matvec(flat, x), 5)
    rows.append(("MXFP4 matvec (layer 0 gate, all experts)", f"{flat.n_elements / t / 1e9:.2f} G weights/s",
                 f"{flat.nbytes / t / 1e9:.1f} GB/s"))
    layer = model.engine.transformer.layers[0]
    ids = rng.choice(cfg.n_expert, (1, cfg.n_expert_used), replace=False)
    wts = np.full((1, cfg.n_expert_used), 1 / cfg.n_expert_used, dtype=np.float32)
    moe = lambda: kernels.moe(layer["ffn_gate_exps.weight"], layer["ffn_up_exps.weight"],  # noqa: E731
                              layer["ffn_down_exps.weight"], layer["ffn_gate_exps.bias"].data,
                              layer["ffn_up_exps.bias"].data, layer["ffn_down_exps.bias"].data, x[None], ids, wts,
                              alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    moe()
    t = timed(moe, 5)
    n = cfg.n_expert_used * 3 * cfg.n_ff_exp * cfg.n_embd
    rows.append(("fused MoE decode (one token, top-k experts)", f"{n / t / 1e9:.2f} G weights/s",
                 f"{n * 17 / 32 / t / 1e9:.1f} GB/s"))

    # Decode after a prompt, through the public API (greedy).
    prompt = rng.integers(0, 199998, args.prompt)
    generation = model.generate(prompt, max_tokens=args.decode, temperature=0, stop_tokens=())
    list(generation)
    s = generation.stats
    rows.append((f"prefill {args.prompt} tokens (before decode)", f"{s.prefill_tokens_per_second:.2f} tok/s",
                 f"{s.prefill_seconds:.1f} s"))
    rows.append((f"decode {s.decode_steps} tokens after a {args.prompt}-token prompt",
                 f"{s.decode_tokens_per_second:.2f} tok/s", f"{s.decode_seconds / max(1, s.decode_steps):.3f} s/token"))

    if args.prefill:
        cache = model.engine.transformer.new_cache(args.prefill)
        tokens = rng.integers(0, 199998, args.prefill)
        t0 = time.perf_counter()
        model.engine.transformer.forward(tokens, cache)
        t = time.perf_counter() - t0
        rows.append((f"prefill {args.prefill} tokens (one chunk)", f"{args.prefill / t:.2f} tok/s", f"{t:.1f} s"))

    rows.append(("first start (empty Numba cache): load / first tokens", f"{first['load']:.2f} s",
                 f"{first['first_tokens']:.2f} s"))
    rows.append(("second start (cached kernels): load / first tokens", f"{second['load']:.2f} s",
                 f"{second['first_tokens']:.2f} s"))
    rows.append(("peak RSS (mapped file pages included)",
                 f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", ""))

    print(f"# {os.path.basename(args.model)}, {args.threads} threads, ossrt {ossrt.__version__}")
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>22}  {b:>16}")


if __name__ == "__main__":
    main()
