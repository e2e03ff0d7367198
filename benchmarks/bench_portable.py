"""Decode speed of the x86 row functions vs the portable ones (what CPUs other than x86 and AArch64 run), side by side
on this x86 machine.

    python benchmarks/bench_portable.py MODEL.gguf [--threads 2] [--prompt 8] [--decode 8] [--rounds 3] [--mlock]

Each measurement is a child process that patches `platform.machine()` before importing ossrt, so `simd.ISA` is
"x86" (machine "x86_64") or "portable" (machine "riscv64": any name that is neither x86 nor ARM; "arm64" would
select the AArch64 path, whose NEON `tbl` LLVM cannot compile for x86). Each path has its own Numba cache
directory, new at the start, so no kernel compiled for one path is loaded by the other. The children run
alternately (x86, portable, x86, ...) so noise from other work on the machine hits both; decode is timed after a
warm-up pass that compiles the kernels, with the same random prompt and greedy decoding in every child, and the
generated tokens of the two paths are compared. On a machine whose other work evicts the model's pages, `--mlock`
keeps them in RAM (ossrt.load(mlock=True)), so both paths read the weights from memory, not from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MACHINES = {"x86": "x86_64", "portable": "riscv64"}

CHILD = """
import json, platform, sys
machine = sys.argv[2]
platform.machine = lambda: machine
import numpy as np
import ossrt
from ossrt.engine import simd

model = ossrt.load(sys.argv[1], context_length=256, threads=int(sys.argv[3]), prefetch=False,
                   mlock=sys.argv[6] == "mlock")
prompt_len, decode = int(sys.argv[4]), int(sys.argv[5])
warm = model.engine.transformer.new_cache(256)
model.engine.transformer.forward([1, 2, 3], warm)  # compiles the prefill kernels
model.engine.transformer.forward([4], warm)  # and the decode kernels
prompt = np.random.default_rng(0).integers(0, 199998, prompt_len)
generation = model.generate(prompt, max_tokens=decode, temperature=0, stop_tokens=())
tokens = [int(t) for t in generation]
s = generation.stats
print(json.dumps({"isa": simd.ISA, "decode": s.decode_tokens_per_second, "prefill": s.prefill_tokens_per_second,
                  "tokens": tokens}))
"""


def run(path: str, machine: str, cache_dir: str, args) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD, path, machine, str(args.threads), str(args.prompt),
                          str(args.decode), "mlock" if args.mlock else "map"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=8, help="tokens to decode, timed")
    ap.add_argument("--rounds", type=int, default=3, help="children per path, run alternately")
    ap.add_argument("--mlock", action="store_true", help="lock the model file in RAM in each child")
    args = ap.parse_args()

    results: dict[str, list[dict]] = {name: [] for name in MACHINES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, machine in MACHINES.items():
                res = run(args.model, machine, os.path.join(tmp, name), args)
                if res["isa"] != name:
                    raise SystemExit(f"machine {machine!r} selected simd.ISA {res['isa']!r}, expected {name!r}")
                results[name].append(res)
                print(f"round {r + 1} {name:<8} decode {res['decode']:6.2f} tok/s  prefill {res['prefill']:6.2f} tok/s",
                      flush=True)

    print(f"# {os.path.basename(args.model)}, {args.threads} threads, {args.prompt}-token prompt, "
          f"{args.decode} decode tokens, {args.rounds} alternating rounds{', mlock' if args.mlock else ''}")
    medians = {}
    for name, runs in results.items():
        decode = [r["decode"] for r in runs]
        medians[name] = statistics.median(decode)
        print(f"{name:<8} decode median {medians[name]:6.2f} tok/s  (min {min(decode):.2f}, max {max(decode):.2f})")
    print(f"portable / x86 decode: {medians['portable'] / medians['x86']:.2f}")
    same = results["x86"][0]["tokens"] == results["portable"][0]["tokens"]
    print(f"greedy tokens equal on both paths: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
