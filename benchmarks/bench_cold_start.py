"""Time to the first token after start, with the model file cold (not in the page cache) or warm, with and
without the background prefetch (`ossrt.load(prefetch=...)`, `--no-prefetch`).

    python benchmarks/bench_cold_start.py [MODEL.gguf] [--runs 1] [--threads N] [--delay 0]

Each run is a fresh child process: import ossrt, load the model, render a short Harmony chat prompt and generate
one token (greedy). `--delay S` waits S seconds between load and prompt, as a user typing the first message would.
A cold run first evicts the file's pages with posix_fadvise(POSIX_FADV_DONTNEED), which needs no privilege (unlike
/proc/sys/vm/drop_caches) but spares pages that another process has mapped: the table shows how much of the file
was still cached when each run started. Configurations alternate, run after run, so noise hits them all; a warm
run first reads the whole file. Numba's compiled kernels load from its cache in every child (a first
child compiles them if needed), so start-up compile time is equal across rows.

Last run (2 cores Sapphire Rapids, 24 GiB RAM, a virtio disk reading ~1.1 GB/s, the 11.3 GiB q8_0 20b, 79 prompt
tokens, 2 threads, medians of 2, load average 2.0 from other work):

| page cache | prefetch | cached at start | load s | first token s (median, min–max) | start to token s |
|---|---|---|---|---|---|
| cold | off | 0% | 0.22 | 14.29 (13.69–14.90) | 15.06 |
| cold | on | 0% | 0.22 | 7.85 (7.74–7.96) | 8.60 |
| warm | off | 100% | 0.21 | 4.61 (4.60–4.63) | 5.34 |
| warm | on | 100% | 0.22 | 4.73 (4.67–4.78) | 5.57 |
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import statistics
import subprocess
import sys

import numpy as np

DEFAULT_MODEL = "/work/models/gpt-oss-20b-synth-q8_0.gguf"
PROMPT = "What is the capital of France? Answer in one word."

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import ossrt
from ossrt.harmony import render_conversation
path, threads, prefetch, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
t1 = time.perf_counter()
model = ossrt.load(path, context_length=512, threads=threads, prefetch=prefetch)
t2 = time.perf_counter()
ids = render_conversation(model.tokenizer, [{"role": "user", "content": sys.argv[5]}], current_date="2026-01-01")
time.sleep(delay)
t3 = time.perf_counter()
next(iter(model.generate(ids, max_tokens=1, temperature=0)))
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "prompt_tokens": len(ids), "first_token": t4 - t3,
                  "start_to_token": t4 - t0 - delay}))
"""


def resident_fraction(path: str) -> float:
    """The share of the file's pages in the page cache (mincore(2) over a fresh read-only map)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            view = np.frombuffer(buf, dtype=np.uint8)  # the map's address: ctypes takes none of a read-only buffer
            failed = libc.mincore(view.ctypes.data, size, vec) != 0
            del view
            if failed:
                raise OSError(ctypes.get_errno(), "mincore")
            return float(np.count_nonzero(np.frombuffer(vec.raw, np.uint8) & 1)) / pages


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        chunk = bytearray(16 << 20)
        while f.readinto(chunk):
            pass


def child(path: str, threads: int, prefetch: bool, delay: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(threads), "1" if prefetch else "0", str(delay),
                          PROMPT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=1, help="runs per configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between load and the prompt")
    args = parser.parse_args()

    print(f"{args.model}: {os.path.getsize(args.model) / 2**30:.1f} GiB, threads {args.threads}, delay "
          f"{args.delay:g} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    warm(args.model)
    child(args.model, args.threads, False, 0.0)  # compiles the kernels into Numba's cache if needed
    configs = [("cold", False), ("cold", True), ("warm", False), ("warm", True)]
    results: dict[tuple[str, bool], list[dict]] = {c: [] for c in configs}
    for run in range(args.runs):
        for state, prefetch in configs:
            if state == "cold":
                evict(args.model)
            else:
                warm(args.model)
            cached = resident_fraction(args.model)
            r = child(args.model, args.threads, prefetch, args.delay)
            r["cached"] = cached
            results[(state, prefetch)].append(r)
            print(f"  run {run + 1} {state} prefetch={prefetch}: cached {cached:.0%} before, load {r['load']:.2f} s, "
                  f"first token {r['first_token']:.2f} s ({r['prompt_tokens']} prompt tokens)", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| page cache | prefetch | cached at start | load s | first token s (median, min–max) | start to token s |")
    print("|---|---|---|---|---|---|")
    for (state, prefetch), rs in results.items():
        first = [r["first_token"] for r in rs]
        print(f"| {state} | {'on' if prefetch else 'off'} | {statistics.median(r['cached'] for r in rs):.0%} | "
              f"{statistics.median(r['load'] for r in rs):.2f} | {statistics.median(first):.2f} "
              f"({min(first):.2f}–{max(first):.2f}) | {statistics.median(r['start_to_token'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
