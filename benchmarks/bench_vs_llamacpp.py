"""ossrt and a native llama.cpp side by side on the same GGUF file, same machine, same thread count.

    benchmarks/build_llamacpp.sh          # llama-cpp-python built natively in /work/llama-venv (once)
    python benchmarks/bench_vs_llamacpp.py MODEL.gguf [--threads 2] [--runs 3] [--llama-python PATH]

The engines run alternately, each run in a fresh child process (ossrt, llama.cpp, ossrt, llama.cpp, ...), so noise
from other work on the machine hits both; each figure is printed as the median and the min-max spread over the
runs, with the ratio of the medians. A run measures: decode tok/s (greedy, 16 tokens after a 128-token prompt),
prefill tok/s on 512 tokens, and the time to first token for a 60- and a 2,000-token prompt (prefill of the prompt,
then one decode step). Prompts are random token ids, the same for both engines (work per token is the same for any
text but for which experts each token routes to).

ossrt's runs also measure the machine's read bandwidth over the mapped file (every byte read, profile_decode's
`read_bandwidth`) and its MXFP4 matvec; decode is printed as a share of the bandwidth limit, the weight bytes a
token reads divided by that bandwidth. Last, one more ossrt child prints ossrt's per-operation decode profile
(profile_decode's `Profile`).

llama.cpp is what `--llama-python` imports (default: build_llamacpp.sh's venv); the benchmark prints its version,
its system_info (the CPU features it was compiled for: AVX512, AMX, ...) and the weight buffers it loaded (CPU_REPACK
or AMX = repacked weights, llama.cpp's default; `--no-extra-bufts` turns them off). Where the CPU has AMX but the
sandbox does not enable its tile state, a stock native build dies (SIGSEGV, a general protection fault at
`ldtilecfg` in ggml_backend_amx_mul_mat) on its first batch: build with `build_llamacpp.sh --no-amx` there; a child
that crashes is reported and the other runs go on. Without a llama-cpp-python the benchmark measures ossrt alone and
says why.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT, DECODE, PREFILL = 128, 16, 512
TTFT_PROMPTS = (60, 2000)
PROFILE_DECODE = 32
# Both engines warm up on a prompt this long before anything is timed: enough tokens to run every kernel width (an
# expert chosen by more than 8 of its tokens, attention projections of more than 8).
WARMUP = 40
LLAMA_VENV = Path("/work/llama-venv")  # where build_llamacpp.sh builds it
# llama.cpp's own defaults (llama-cli, llama-server): logical batch 2048, physical batch 512.
LLAMA_BATCH, LLAMA_UBATCH = 2048, 512
HERE = Path(__file__).resolve().parent


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 199000, n)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def weight_bytes_per_token(model_file) -> float:
    """Weight bytes a decode step reads: every dense tensor, n_expert_used of n_expert experts' share of the expert
    tensors, one row of the token embeddings. The same for every engine reading this file."""
    cfg = model_file.config
    total = 0.0
    for name, t in model_file.tensors.items():
        if name.endswith("_exps.weight"):
            total += t.nbytes * cfg.n_expert_used / cfg.n_expert
        elif name == "token_embd.weight":
            total += t.nbytes / t.shape[0]
        else:
            total += t.nbytes
    return total


def timed_runs(prefill, decode_step, reset, ttft_prompts: list[int]) -> dict:
    """The measurements of one run, through three engine callbacks: `prefill(ids)` appends ids to the sequence and
    returns the last logits, `decode_step(logits)` appends their argmax and returns the next logits, `reset()`
    empties the sequence. Time to first token for prompts of each length in `ttft_prompts`."""
    out = {}
    reset()
    t0 = time.perf_counter()
    prefill(tokens(PREFILL, 1))
    out["prefill"] = PREFILL / (time.perf_counter() - t0)

    reset()
    logits = prefill(tokens(PROMPT, 2))
    t0 = time.perf_counter()
    for _ in range(DECODE):
        logits = decode_step(logits)
    out["decode"] = DECODE / (time.perf_counter() - t0)

    for n in ttft_prompts:
        reset()
        t0 = time.perf_counter()
        decode_step(prefill(tokens(n, 3)))
        out[f"ttft{n}"] = time.perf_counter() - t0
    return out


def ossrt_model(path: str, threads: int, context: int):
    import ossrt

    model = ossrt.load(path, context_length=context, threads=threads)
    if model.model_file.prefetch_thread is not None:  # the file's pages in before anything is timed
        model.model_file.prefetch_thread.join()
    return model


def child_ossrt(path: str, threads: int, context: int, ttft_prompts: list[int]) -> dict:
    import numba

    import ossrt
    from ossrt.engine import kernels
    from ossrt.format.modelfile import Tensor

    sys.path.insert(0, str(HERE))
    from profile_decode import read_bandwidth

    model = ossrt_model(path, threads, context)
    tr = model.engine.transformer
    bandwidth = read_bandwidth(list(model.model_file.tensors.values()))

    # One layer's gate experts as one MXFP4 matrix: the matvec's own rate against that bandwidth.
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

    cache = [tr.new_cache(context)]

    def reset():
        cache[0] = tr.new_cache(context)

    def prefill(ids):
        return tr.forward(ids, cache[0])[-1]

    def decode_step(logits):
        return tr.forward([int(np.argmax(logits))], cache[0])[-1]

    decode_step(prefill(tokens(WARMUP, 9)))  # every kernel compiled or loaded before timing
    result = timed_runs(prefill, decode_step, reset, ttft_prompts)
    result.update(engine=f"ossrt {ossrt.__version__} (numba {numba.__version__}, KV cache {model.kv_type})",
                  rss=peak_rss_gib(), bandwidth=bandwidth, matvec_gb=flat.nbytes / matvec_s / 1e9,
                  matvec_gw=flat.n_elements / matvec_s / 1e9,
                  weights_per_token=weight_bytes_per_token(model.model_file))
    return result


def child_profile(path: str, threads: int) -> dict:
    """ossrt's decode with every operation timed (profile_decode's Profile), after a 128-token prompt."""
    sys.path.insert(0, str(HERE))
    from profile_decode import decode_profiled, read_bandwidth

    model = ossrt_model(path, threads, PROMPT + PROFILE_DECODE + 8)
    profile, total = decode_profiled(model.engine.transformer, tokens(PROMPT, 2), PROFILE_DECODE)
    return {"total": total, "tokens": PROFILE_DECODE, "seconds": dict(profile.seconds),
            "bytes": dict(profile.bytes), "bandwidth": read_bandwidth(list(model.model_file.tensors.values()))}


def child_llama(path: str, threads: int, context: int, extra_bufts: bool, ttft_prompts: list[int]) -> dict:
    import llama_cpp
    import llama_cpp.llama as high_level

    if not extra_bufts:
        params = high_level.llama_cpp.llama_model_default_params  # what `Llama` calls
        high_level.llama_cpp.llama_model_default_params = lambda: _no_extra_bufts(params())
    # verbose: llama.cpp logs its weight buffers (CPU_Mapped, CPU_REPACK, AMX) on stderr, which the parent reads.
    # flash_attn: llama.cpp's own default ("auto") turns it on for the CPU; llama-cpp-python's turns it off.
    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=LLAMA_BATCH, n_ubatch=LLAMA_UBATCH, flash_attn=True, verbose=True)
    n_vocab = llm.n_vocab()

    def last_logits():
        # Llama.eval keeps no logits unless logits_all; read the last position's from the context.
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    def prefill(ids):
        llm.eval(ids)
        return last_logits()

    def decode_step(logits):
        llm.eval([int(np.argmax(logits))])
        return last_logits()

    decode_step(prefill(tokens(WARMUP, 9)))
    result = timed_runs(prefill, decode_step, llm.reset, ttft_prompts)
    ggml = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
    ggml.ggml_version.restype = ggml.ggml_commit.restype = ctypes.c_char_p
    result.update(engine=f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (ggml "
                         f"{ggml.ggml_version().decode()}, commit {ggml.ggml_commit().decode()}; flash attention on)",
                  system_info=llama_cpp.llama_print_system_info().decode().strip(),
                  extra_bufts=extra_bufts, rss=peak_rss_gib())
    return result


def _no_extra_bufts(p):
    p.use_extra_bufts = False
    return p


def run_child(engine: str, path: str, args, ttft_prompts: tuple[int, ...] = ()) -> dict:
    """One measurement in a fresh process; {"error": ...} if the child fails (llama.cpp's AMX path has crashed)."""
    python = args.llama_python if engine == "llama" else sys.executable
    cmd = [python, __file__, path, "--child", engine, "--threads", str(args.threads), "--context",
           str(args.context), "--ttft", *map(str, ttft_prompts)] + ([] if args.extra_bufts else ["--no-extra-bufts"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"error": f"{engine} child exited with {proc.returncode}:\n{tail}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if engine == "llama":  # the weight buffers llama.cpp put the model in, from its load log
        result["buffers"] = sorted({_buffer(line) for line in proc.stderr.splitlines() if "model buffer size" in line})
    return result


def _buffer(log_line: str) -> str:
    """'load_tensors:   CPU_REPACK model buffer size =  9682.03 MiB' -> 'CPU_REPACK 9682 MiB'."""
    name, size = log_line.split(":", 1)[1].split("model buffer size =")
    return f"{name.strip()} {float(size.split()[0]):.0f} {size.split()[1]}"


def llama_python(args) -> tuple[str | None, str]:
    """The Python with llama-cpp-python to use, or None and why not."""
    python = args.llama_python or str(LLAMA_VENV / "bin" / "python")
    if not Path(python).exists():
        return None, f"{python} does not exist: run benchmarks/build_llamacpp.sh or pass --llama-python"
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"{python} cannot import llama_cpp: {probe.stderr.strip().splitlines()[-1]}"
    return python, ""


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def print_profile(p: dict) -> None:
    sys.path.insert(0, str(HERE))
    from profile_decode import print_table

    n, total, bandwidth = p["tokens"], p["total"], p["bandwidth"]
    print(f"# ossrt decode profile: {n} tokens after {PROMPT}, {n / total:.2f} tok/s, {total / n * 1e3:.1f} ms/token, "
          f"read bandwidth {bandwidth:.1f} GB/s")
    print_table(p["seconds"], p["bytes"], n, total, bandwidth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="runs per engine, alternating (median and spread)")
    ap.add_argument("--context", type=int, default=4096, help="context length both engines are loaded with")
    ap.add_argument("--llama-python", help=f"the Python that has llama-cpp-python (default {LLAMA_VENV}/bin/python)")
    ap.add_argument("--no-extra-bufts", dest="extra_bufts", action="store_false",
                    help="llama.cpp without its extra buffer types (repacked weights, AMX); on by default, as "
                         "llama.cpp's users get it")
    ap.add_argument("--long-runs", type=int,
                    help=f"measure the {max(TTFT_PROMPTS)}-token time to first token in only the first N runs per "
                         "engine (default: every run)")
    ap.add_argument("--ttft", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip ossrt's decode profile")
    ap.add_argument("--child", choices=["ossrt", "llama", "profile"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 1 or args.threads < 1:
        ap.error("--runs and --threads must be at least 1")
    if args.context < max(TTFT_PROMPTS) + 1 or args.context < PROMPT + DECODE + 1:
        ap.error(f"--context must hold the {max(TTFT_PROMPTS)}-token prompt and one more token")
    if args.child:
        if args.child == "ossrt":
            result = child_ossrt(args.model, args.threads, args.context, args.ttft)
        elif args.child == "profile":
            result = child_profile(args.model, args.threads)
        else:
            result = child_llama(args.model, args.threads, args.context, args.extra_bufts, args.ttft)
        print(json.dumps(result))
        return

    args.llama_python, why_not = llama_python(args)
    engines = ["ossrt", "llama"] if args.llama_python else ["ossrt"]
    print(f"# {os.path.basename(args.model)}: {args.threads} threads, context {args.context}, {args.runs} runs per "
          f"engine, alternating ({', '.join(engines * 2)}, ...)", flush=True)
    if why_not:
        print(f"# llama.cpp not measured: {why_not}")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    long_runs = args.runs if args.long_runs is None else args.long_runs
    for i in range(args.runs):
        ttft_prompts = TTFT_PROMPTS if i < long_runs else tuple(n for n in TTFT_PROMPTS if n < max(TTFT_PROMPTS))
        for engine in engines:
            r = run_child(engine, args.model, args, ttft_prompts)
            print(f"#   run {i + 1} {engine}: " + (r["error"] if "error" in r else ", ".join(
                f"{k} {r[k]:.2f}" for k in ("decode", "prefill", *(f"ttft{n}" for n in ttft_prompts)))), flush=True)
            if "error" not in r:
                runs[engine].append(r)
    o, ll = runs["ossrt"], runs.get("llama", [])
    if not o:
        sys.exit("ossrt failed in every run")

    print(f"# ossrt: {o[0]['engine']}")
    if ll:
        print(f"# llama.cpp: {ll[0]['engine']}, python {args.llama_python}")
        build = Path(args.llama_python).parent.parent / "llamacpp-build.txt"  # written by build_llamacpp.sh
        if build.exists():
            print("".join(f"#   {line}\n" for line in build.read_text().splitlines()), end="")
        print(f"#   system_info: {ll[0]['system_info']}")
        print(f"#   extra buffer types (repacked weights) {'on' if ll[0]['extra_bufts'] else 'off'}; "
              f"weight buffers: {'; '.join(ll[0]['buffers'])}")
    rows = [("decode after 128 tokens (tok/s)", "decode"), ("prefill 512 tokens (tok/s)", "prefill")]
    rows += [(f"time to first token, {n} tokens (s)", f"ttft{n}") for n in TTFT_PROMPTS]
    print("# ratio: ossrt's speed over llama.cpp's, from the medians (> 1: ossrt is faster; for times, llama.cpp's "
          "time over ossrt's)")
    print(f"{'':38}{'ossrt median (min-max)':>26}{'llama.cpp median (min-max)':>28}{'ratio':>8}")
    for label, key in rows:
        ov = [r[key] for r in o if key in r]
        if not ov:
            continue
        line = f"{label:38}{spread(ov):>26}"
        lv = [r[key] for r in ll if key in r]
        if lv:
            # Ratios say how much faster ossrt is: rates divide ossrt by llama.cpp, times the other way round.
            ratio = statistics.median(ov) / statistics.median(lv)
            line += f"{spread(lv):>28}{(ratio if key in ('decode', 'prefill') else 1 / ratio):7.2f}x"
        print(line)
    print(f"{'peak RSS (GiB)':38}{statistics.median(r['rss'] for r in o):>26.2f}"
          + (f"{statistics.median(r['rss'] for r in ll):>28.2f}" if ll else ""))

    bandwidth = statistics.median(r["bandwidth"] for r in o)
    weights = o[0]["weights_per_token"]
    limit = bandwidth * 1e9 / weights
    print(f"read bandwidth over the mapped file (every byte): {spread([r['bandwidth'] for r in o]).strip()} GB/s; "
          f"a decode step reads {weights / 1e9:.2f} GB of weights: limit {limit:.2f} tok/s")
    print(f"decode as a share of that limit: ossrt {statistics.median(r['decode'] for r in o) / limit:.0%}"
          + (f", llama.cpp {statistics.median(r['decode'] for r in ll) / limit:.0%}" if ll else ""))
    matvec = statistics.median(r["matvec_gb"] for r in o)
    print(f"ossrt MXFP4 matvec (one layer's gate experts): {statistics.median(r['matvec_gw'] for r in o):.1f} "
          f"G weights/s = {matvec:.1f} GB/s ({matvec / bandwidth:.0%} of the bandwidth)")
    if args.profile:
        p = run_child("profile", args.model, args)
        print()
        print(p["error"]) if "error" in p else print_profile(p)


if __name__ == "__main__":
    main()
