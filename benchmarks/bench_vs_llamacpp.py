"""ossrt and llama.cpp side by side on the same GGUF file, same machine, same thread count.

    pip install llama-cpp-python          # benchmark only; pip builds it from source
    python benchmarks/bench_vs_llamacpp.py MODEL.gguf [MODEL2.gguf ...] [--threads 2] [--runs 3]

Each engine runs in its own child process (so each has its own peak RSS): decode tokens/s after a 128-token prompt
(greedy, median of `--runs` runs of 16 tokens), prefill tokens/s on 512 tokens, peak RSS. ossrt's child also
measures its MXFP4 matvec (G weights/s, GB/s) and the machine's read bandwidth over the same mapped file with the
same threads, in the same run, and its peak RSS once a KV cache for the model's whole context is filled.

llama.cpp runs without its extra buffer types (AMX tiles, repacked weights) unless `--extra-bufts`: a stock
llama-cpp-python build on an AMX-capable CPU in these sandboxes segfaults in its AMX path. To measure the repacked
path, build llama-cpp-python without AMX (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ... -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF") in its own venv and pass `--llama-python that/venv/bin/python --extra-bufts`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

PROMPT, DECODE, PREFILL = 128, 16, 512


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 199000, n)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_ossrt(path: str, threads: int, runs: int, context: int) -> dict:
    import numba
    from numba import njit, prange

    import ossrt
    from ossrt.engine import kernels
    from ossrt.format.modelfile import Tensor

    model = ossrt.load(path, context_length=context, threads=threads)
    tr = model.engine.transformer

    @njit(parallel=True, cache=True)
    def read_all(a):
        total = np.uint64(0)
        for i in prange(a.shape[0] // 64):
            total += a[i * 64]  # one byte per cache line: the time is the memory traffic
        return total

    experts = [t for n, t in model.model_file.tensors.items() if n.endswith("_exps.weight")]
    for t in experts:  # map every page once so neither measurement pays first-touch faults
        read_all(t.data.reshape(-1))
    t0 = time.perf_counter()
    for t in experts:
        read_all(t.data.reshape(-1))
    bandwidth = sum(t.nbytes for t in experts) / (time.perf_counter() - t0) / 1e9

    gate = model.model_file.tensors["blk.0.ffn_gate_exps.weight"]
    flat = Tensor(gate.name, gate.type, (gate.shape[0] * gate.shape[1], gate.shape[2]),
                  gate.data.reshape(-1, gate.data.shape[-1]))
    x = np.random.default_rng(0).standard_normal(flat.shape[1]).astype(np.float32)
    kernels.matvec(flat, x)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        kernels.matvec(flat, x)
        times.append(time.perf_counter() - t0)
    matvec_s = min(times)

    cache = tr.new_cache(PREFILL)
    tr.forward(tokens(4, 9), cache)  # compile every kernel before timing
    cache = tr.new_cache(PREFILL)
    t0 = time.perf_counter()
    tr.forward(tokens(PREFILL, 1), cache)
    prefill = PREFILL / (time.perf_counter() - t0)

    cache = tr.new_cache(PROMPT + runs * DECODE + 1)
    logits = tr.forward(tokens(PROMPT, 2), cache)[-1]
    decode = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(DECODE):
            logits = tr.forward([int(np.argmax(logits))], cache)[-1]
        decode.append(DECODE / (time.perf_counter() - t0))
    rss = peak_rss_gib()
    # The memory a conversation at the model's whole context needs: a KV cache of that size with every page
    # written (the cache's pages are committed as positions fill). Smaller type first, as RSS is a peak.
    full = {}
    for kv_type in ("q8_0", "f16"):
        cache = tr.new_cache(model.config.n_ctx_train, kv_type)
        for a in (a for layer in cache.layers for a in layer.arrays):
            a.fill(1)
        full[kv_type] = (cache.nbytes / 2**30, peak_rss_gib())
        del cache
    return {"engine": f"ossrt {ossrt.__version__} (numba {numba.__version__})", "decode": statistics.median(decode),
            "decode_runs": decode, "prefill": prefill, "rss": rss, "bandwidth": bandwidth,
            "matvec_gw": flat.n_elements / matvec_s / 1e9, "matvec_gb": flat.nbytes / matvec_s / 1e9,
            "rss_full": full, "n_ctx_train": model.config.n_ctx_train}


def child_llama(path: str, threads: int, runs: int, context: int, extra_bufts: bool) -> dict:
    import llama_cpp
    import llama_cpp.llama as high_level

    if not extra_bufts:
        params = high_level.llama_cpp.llama_model_default_params  # what `Llama` calls
        high_level.llama_cpp.llama_model_default_params = lambda: _no_extra_bufts(params())
    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=PREFILL, n_ubatch=PREFILL, verbose=False)
    llm.eval(tokens(4, 9))
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens(PREFILL, 1))
    prefill = PREFILL / (time.perf_counter() - t0)

    llm.reset()
    llm.eval(tokens(PROMPT, 2))
    decode = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(DECODE):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        decode.append(DECODE / (time.perf_counter() - t0))
    bufts = "with" if extra_bufts else "without"
    return {"engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {bufts} extra buffer types",
            "decode": statistics.median(decode), "decode_runs": decode, "prefill": prefill, "rss": peak_rss_gib()}


def _no_extra_bufts(p):
    p.use_extra_bufts = False
    return p


def run_child(engine: str, path: str, args) -> dict:
    python = args.llama_python if engine == "llama" else sys.executable
    cmd = [python, __file__, path, "--child", engine, "--threads", str(args.threads), "--runs",
           str(args.runs), "--context", str(args.context)] + (["--extra-bufts"] if args.extra_bufts else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="decode runs of 16 tokens (median)")
    ap.add_argument("--context", type=int, default=8192, help="context length both engines are loaded with")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the Python that has llama-cpp-python (e.g. a venv with a custom build)")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp use its extra buffer types (AMX, repacked weights)")
    ap.add_argument("--child", choices=["ossrt", "llama"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "ossrt":
            result = child_ossrt(args.models[0], args.threads, args.runs, args.context)
        else:
            result = child_llama(args.models[0], args.threads, args.runs, args.context, args.extra_bufts)
        print(json.dumps(result))
        return

    for path in args.models:
        o = run_child("ossrt", path, args)
        ll = run_child("llama", path, args)
        print(f"# {os.path.basename(path)}: {args.threads} threads, context {args.context}")
        print(f"#   {o['engine']}; {ll['engine']}")
        print(f"{'':34}{'ossrt':>12}{'llama.cpp':>12}{'ratio':>9}")
        for label, key, unit in (("decode after a 128-token prompt", "decode", "tok/s"),
                                 ("prefill 512 tokens", "prefill", "tok/s")):
            print(f"{label + ' (' + unit + ')':34}{o[key]:12.2f}{ll[key]:12.2f}{o[key] / ll[key]:8.2f}x")
        print(f"{'peak RSS (GiB)':34}{o['rss']:12.2f}{ll['rss']:12.2f}")
        for kv_type, (kv, rss) in o["rss_full"].items():
            print(f"ossrt peak RSS with a full {o['n_ctx_train']}-token {kv_type} KV cache ({kv:.2f} GiB): "
                  f"{rss:.2f} GiB = {rss * 2**30 / 1e9:.1f} GB")
        print(f"ossrt decode runs (tok/s): {', '.join(f'{v:.2f}' for v in o['decode_runs'])}; "
              f"llama.cpp: {', '.join(f'{v:.2f}' for v in ll['decode_runs'])}")
        print(f"ossrt MXFP4 matvec: {o['matvec_gw']:.1f} G weights/s = {o['matvec_gb']:.1f} GB/s, "
              f"read bandwidth over the mapped experts: {o['bandwidth']:.1f} GB/s "
              f"({o['matvec_gb'] / o['bandwidth']:.0%})")
        print()


if __name__ == "__main__":
    main()
