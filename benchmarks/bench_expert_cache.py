"""Expert caching (`ossrt.load(..., max_memory=...)`) against plain memory mapping and llama.cpp, on one model file
and thread count: decode speed after a 128-token prompt, cache hit rate, bytes read from disk per token, peak RSS;
and the cache's eviction policies on simulated routing.

    python benchmarks/bench_expert_cache.py MODEL.gguf --budgets 12G 16G 20G [--runs 5] [--threads 2]
    python benchmarks/bench_expert_cache.py MODEL.gguf --simulate-only

Each engine runs in a fresh process, after the page cache is dropped (`/proc/sys/vm/drop_caches`, as root; where
that is refused the runs start warm and the table says so): ossrt with plain mmap, ossrt with the expert cache at
each budget, llama.cpp through llama-cpp-python (mmap, without repacked weights: repacking copies the whole model
into anonymous memory). A run loads the model, prefills a 128-token prompt, then decodes `--runs` stretches of
`--tokens` greedy tokens: decode tok/s is the median over the stretches, bytes from disk come from the process's
`/proc/self/io` over the decode. The disk's own read rate is measured the way the cache reads (8 threads of
expert-sized `preadv` at random offsets) first, with a sequential pass, and again just before and after each engine
(a virtual disk's rate drifts: 1.0-2.3 GB/s within minutes here): the decode rate the disk allows for the bytes an
engine must read per token is the faster of its two measurements over those bytes. An engine on a memory map must read what its page
faults bring in; the cache must read its misses (what it reads ahead on a guess of the next layer's experts, while
it computes, is counted in "disk MB/tok" but not in "must").

The simulation replays routing traces through the cache's own policies (`engine.expert_cache.POLICIES`) at the slot
counts the budgets give: uniform random choices (what a random synthetic model's router makes), Zipf-skewed
popularity per layer (real routers favour some experts), and Zipf with temporal correlation (a token keeps each of
the previous token's experts with probability 0.5, as consecutive tokens of one topic do).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

PROMPT, CONTEXT = 128, 512
LLAMA_VENV = Path("/work/llama-venv")


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 199000, n)]


def io_read_bytes() -> int:
    """Bytes this process caused to be read from storage (Linux /proc/self/io), page faults included."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- simulation -----------------------------------------------------------------------------------------------------
def zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def routing_trace(kind: str, n_tokens: int, layers: int, experts: int, k: int, seed: int = 0) -> np.ndarray:
    """[n_tokens, layers, k] expert ids."""
    rng = np.random.default_rng(seed)
    trace = np.empty((n_tokens, layers, k), dtype=np.int64)
    popularity = [zipf_weights(experts, 1.0, rng) for _ in range(layers)]
    for t in range(n_tokens):
        for layer in range(layers):
            if kind == "uniform":
                trace[t, layer] = rng.choice(experts, k, replace=False)
                continue
            kept = [e for e in trace[t - 1, layer] if rng.random() < 0.5] if kind == "sticky" and t else []
            p = popularity[layer].copy()
            p[kept] = 0
            fresh = rng.choice(experts, k - len(kept), replace=False, p=p / p.sum())
            trace[t, layer] = np.concatenate([np.asarray(kept, dtype=np.int64), fresh])
    return trace


def simulate(policy: str, trace: np.ndarray, slots: int) -> float:
    """Hit rate of the cache's own bookkeeping (`SlotTable`) with `slots` slots replaying `trace`, a layer's
    experts of one token looked up together as `ExpertCache.slots` does; the first pass over the trace warms it."""
    from ossrt.engine.expert_cache import SlotTable

    table = SlotTable(slots, policy)
    hits = lookups = 0
    for warm in (True, False):
        for step in trace:
            for layer, chosen in enumerate(step):
                wanted = sorted(int(e) for e in chosen)
                placed = table.place(layer, wanted)
                if not warm:
                    hits += len(wanted) - len(placed)
                    lookups += len(wanted)
    return hits / lookups


def print_simulation(layers: int, experts: int, k: int, slot_counts: dict[str, int], n_tokens: int) -> None:
    from ossrt.engine.expert_cache import POLICIES

    print(f"# simulated routing: {layers} layers x {experts} experts, top-{k}, {n_tokens} tokens (after as many "
          "to warm the cache); hit rate")
    header = f"{'routing':<10} {'budget':>8} {'slots':>6} {'of all':>7}" + "".join(f" {p:>6}" for p in POLICIES)
    print(header)
    for kind in ("uniform", "zipf", "sticky"):
        trace = routing_trace(kind, n_tokens, layers, experts, k)
        for budget, slots in slot_counts.items():
            rates = [simulate(policy, trace, slots) for policy in POLICIES]
            print(f"{kind:<10} {budget:>8} {slots:>6} {slots / (layers * experts):>7.0%}"
                  + "".join(f" {r:>6.0%}" for r in rates))


# --- the disk --------------------------------------------------------------------------------------------------------
def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def random_read_rate(path: str, chunk: int, total: int, seed: int) -> float:
    """GB/s reading `total` bytes of `path` from a dropped page cache in `chunk`-byte reads at random offsets (drawn
    from `seed`: no two measurements read the same places, which a host's cache could serve) from 8 threads, the
    expert cache's pattern."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache()
        offsets = random.Random(seed).sample(range(0, size - chunk, chunk), min(total // chunk, size // chunk - 1))
        buffers = [bytearray(chunk) for _ in range(8)]

        def reader(i: int) -> None:
            for offset in offsets[i::8]:
                os.preadv(fd, [buffers[i]], offset)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(offsets) * chunk / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def sequential_read_rate(path: str, total: int) -> float:
    """GB/s reading the first `total` bytes of `path` from a dropped page cache in 64 MiB reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache()
        block = bytearray(64 << 20)
        t0, done = time.perf_counter(), 0
        while done < min(total, os.path.getsize(path)):
            done += os.preadv(fd, [block], done)
        return done / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


# --- one engine in a child process -----------------------------------------------------------------------------------
def child_ossrt(path: str, threads: int, budget: str | None, runs: int, n: int) -> dict:
    import ossrt

    t0 = time.perf_counter()
    model = ossrt.load(path, context_length=CONTEXT, threads=threads, max_memory=budget)
    load_s = time.perf_counter() - t0
    if model.model_file.prefetch_thread is not None:
        model.model_file.prefetch_thread.join()
    tr = model.engine.transformer
    cache = tr.new_cache(CONTEXT)
    t0 = time.perf_counter()
    logits = tr.forward(tokens(PROMPT, 2), cache)[-1]
    prefill_s = time.perf_counter() - t0
    experts = tr.ops.experts
    before = (io_read_bytes(), experts.stats.hits if experts else 0, experts.stats.misses if experts else 0)
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            logits = tr.forward([int(np.argmax(logits))], cache)[-1]
        rates.append(n / (time.perf_counter() - t0))
    out = {"load_s": load_s, "prefill_s": prefill_s, "decode": rates, "rss": peak_rss_gib(),
           "disk_per_token": (io_read_bytes() - before[0]) / (runs * n)}
    if experts:
        hits, misses = experts.stats.hits - before[1], experts.stats.misses - before[2]
        out.update(hit_rate=hits / (hits + misses), slots=experts.n_slots,
                   read_per_token=misses * experts.slot_bytes / (runs * n))
    return out


def child_llama(path: str, threads: int, runs: int, n: int) -> dict:
    import llama_cpp
    import llama_cpp.llama as high_level

    params = high_level.llama_cpp.llama_model_default_params

    def no_repack():
        p = params()
        p.use_extra_bufts = False
        return p

    high_level.llama_cpp.llama_model_default_params = no_repack
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads, use_mmap=True,
                          flash_attn=True, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    t0 = time.perf_counter()
    llm.eval(tokens(PROMPT, 2))
    prefill_s = time.perf_counter() - t0
    logits = last()
    before = io_read_bytes()
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(logits))])
            logits = last()
        rates.append(n / (time.perf_counter() - t0))
    return {"load_s": load_s, "prefill_s": prefill_s, "decode": rates, "rss": peak_rss_gib(),
            "disk_per_token": (io_read_bytes() - before) / (runs * n)}


def memory_cgroup(limit: int) -> Path | None:
    """A memory cgroup of `limit` bytes (v2, else v1; as root), or None where none can be made. Its limit covers the
    page cache its processes fill, as a machine's RAM does: the runs then see a machine that small."""
    for root, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"),
                             (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if (root / limit_file).exists() or (root / "cgroup.controllers").exists():
            group = root / "ossrt-bench"
            try:
                group.mkdir(exist_ok=True)
                (group / limit_file).write_text(f"{limit}\n")
                return group
            except OSError:
                continue
    return None


def run_child(args, engine: str, budget: str | None = None) -> dict:
    python = args.llama_python or str(LLAMA_VENV / "bin" / "python") if engine == "llama" else sys.executable
    cmd = [python, __file__, args.model, "--child", engine, "--threads", str(args.threads), "--runs", str(args.runs),
           "--tokens", str(args.tokens)] + (["--child-budget", budget] if budget else [])
    if args.cgroup is not None:  # the child joins the cgroup before it starts
        cmd = ["sh", "-c", f'echo $$ > {args.cgroup / "cgroup.procs"} && exec "$@"', "sh", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": "\n".join(proc.stderr.strip().splitlines()[-5:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--budgets", nargs="*", default=["12G", "16G", "20G"], help="max_memory values for ossrt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="decode stretches per engine (the median is reported)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per decode stretch")
    ap.add_argument("--sim-tokens", type=int, default=300, help="tokens of each simulated routing trace")
    ap.add_argument("--simulate-only", action="store_true")
    ap.add_argument("--no-llama", dest="llama", action="store_false")
    ap.add_argument("--machine-memory", metavar="SIZE",
                    help="run every engine in a memory cgroup of SIZE (page cache included), as on a machine with "
                         "that much RAM")
    ap.add_argument("--llama-python")
    ap.add_argument("--child", choices=["ossrt", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "ossrt":
        print(json.dumps(child_ossrt(args.model, args.threads, args.child_budget, args.runs, args.tokens)))
        return
    if args.child == "llama":
        print(json.dumps(child_llama(args.model, args.threads, args.runs, args.tokens)))
        return

    import ossrt
    from ossrt.engine.expert_cache import WORKING_MEMORY, memory_plan, parse_size

    with ossrt.load(args.model, context_length=CONTEXT, prefetch=False) as m:
        cfg, mf = m.model_file.config, m.model_file
        slot_bytes = 3 * mf.tensors["blk.0.ffn_gate_exps.weight"].nbytes // cfg.n_expert
        mapped, kv, _ = memory_plan(mf, CONTEXT, m.kv_type)
        slot_counts = {budget: min((parse_size(budget) - mapped - kv - WORKING_MEMORY) // slot_bytes,
                                   cfg.n_layer * cfg.n_expert) for budget in args.budgets}
        file_size = mf.file_size
    print(f"# {args.model}: {file_size / 2**30:.1f} GiB, {cfg.n_layer} layers x {cfg.n_expert} experts "
          f"({slot_bytes / 2**20:.1f} MiB each), {args.threads} threads")
    print_simulation(cfg.n_layer, cfg.n_expert, cfg.n_expert_used, slot_counts, args.sim_tokens)
    if args.simulate_only:
        return

    args.cgroup = None
    if args.machine_memory:
        args.cgroup = memory_cgroup(parse_size(args.machine_memory, "--machine-memory"))
        if args.cgroup is None:
            sys.exit("--machine-memory: no memory cgroup could be made here (it needs root and cgroup v1 or v2)")
        print(f"# every engine runs in {args.cgroup}: RAM and page cache limited to {args.machine_memory}")
    chunk, total = slot_bytes // 3, 4 << 30
    random_rate, sequential_rate = random_read_rate(args.model, chunk, total, seed=0), \
        sequential_read_rate(args.model, total)
    cold = drop_page_cache()
    print(f"# disk: {random_rate:.2f} GB/s in {chunk / 2**20:.1f} MiB reads at random offsets from 8 threads, "
          f"{sequential_rate:.2f} GB/s sequential; each run starts "
          + ("with the page cache dropped" if cold else "WARM (the page cache could not be dropped)"))
    print("# a virtual disk's rate drifts from minute to minute: it is measured again just before and after each "
          "engine's run, and \"disk GB/s\" is the faster of the two")
    configs = [("ossrt mmap", "ossrt", None)] + [(f"ossrt cache {b}", "ossrt", b) for b in args.budgets]
    if args.llama:
        configs.append(("llama.cpp mmap", "llama", None))
    print(f"{'engine':<18} {'decode tok/s':>22} {'hit rate':>8} {'disk MB/tok':>11} {'must MB/tok':>11} "
          f"{'disk GB/s':>9} {'disk allows':>11} {'of that':>7} {'peak RSS GiB':>12} {'load s':>7} {'prefill s':>9}")
    for i, (label, engine, budget) in enumerate(configs):
        before = random_read_rate(args.model, chunk, total, seed=2 * i + 1)
        drop_page_cache()
        r = run_child(args, engine, budget)
        disk = max(before, random_read_rate(args.model, chunk, total, seed=2 * i + 2))
        if "error" in r:
            print(f"{label:<18} failed: {r['error']}")
            continue
        rate = statistics.median(r["decode"])
        # What an engine must read: the cache's misses (its read-ahead of guessed experts is a choice it makes to
        # use the disk while it computes); everything a memory map faults in.
        must = r.get("read_per_token", r["disk_per_token"])
        allows = disk * 1e9 / must if must else float("inf")
        hit = f"{r['hit_rate']:.0%}" if "hit_rate" in r else "-"
        print(f"{label:<18} {rate:>8.2f} ({min(r['decode']):.2f}-{max(r['decode']):.2f}) {hit:>8} "
              f"{r['disk_per_token'] / 1e6:>11.0f} {must / 1e6:>11.0f} {disk:>9.2f} {allows:>11.2f} "
              f"{rate / allows:>7.0%} {r['rss']:>12.2f} {r['load_s']:>7.1f} {r['prefill_s']:>9.1f}", flush=True)

if __name__ == "__main__":
    main()
