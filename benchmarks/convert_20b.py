"""Convert the full-size synthetic gpt-oss-20b and report time, MB/s and peak RSS.

    nice python benchmarks/convert_20b.py [--models /work/models] [--outtype q8_0]

Writes the synthetic HF checkpoint once (`gpt-oss-20b-synth-hf/`, reused if present), then converts it in a
child process so its peak RSS is measured alone (wait4's ru_maxrss of that child).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/work/models"))
    ap.add_argument("--outtype", default="q8_0")
    args = ap.parse_args()
    args.models.mkdir(parents=True, exist_ok=True)
    src = args.models / "gpt-oss-20b-synth-hf"
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ossrt.testing.synthetic", str(src), "--size", "20b"], check=True)
        print(f"synthetic checkpoint: {time.perf_counter() - t:.1f} s", flush=True)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out = args.models / f"gpt-oss-20b-synth-{args.outtype}.gguf"
    t = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "ossrt.cli", "convert", str(src), "-o", str(out),
                              "--outtype", args.outtype, "-q"])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the generator's
    dt = time.perf_counter() - t
    if status:
        sys.exit(f"convert failed (status {status})")
    rss = usage.ru_maxrss / 2**20  # KiB -> GiB (Linux)
    size = out.stat().st_size
    print(f"convert 20b {args.outtype}: {dt:.1f} s, {src_bytes / dt / 1e6:.0f} MB/s read, "
          f"{size / dt / 1e6:.0f} MB/s written, peak RSS {rss:.2f} GiB, file {size / 1e9:.2f} GB ({size} bytes)")


if __name__ == "__main__":
    main()
