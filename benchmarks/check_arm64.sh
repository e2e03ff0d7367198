#!/usr/bin/env bash
# The row kernels' AArch64 code (NEON `tbl` for MXFP4, native f16 conversion) and the portable code, checked on an
# emulated AArch64 CPU: QEMU user-mode runs Debian's arm64 CPython with PyPI's aarch64 wheels of the versions this
# checkout's venv has, and with them pytest on tests/test_simd_portable.py (portable functions against NumPy, and
# bit for bit against the tbl path) and tests/test_kernels.py (the kernels through the AArch64 path against gguf's
# dequantizer and NumPy). Root, Debian; downloads ~100 MB once into $ARM64_ROOT.
#
#     bash benchmarks/check_arm64.sh [pytest args...]     (default: the two test files above)
#
# Numba compiles under emulation, so expect minutes. It checks results, not speed: QEMU's timings mean nothing.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ARM64_ROOT:-/tmp/ossrt-arm64}
HOST_PY=${HOST_PY:-$REPO/.venv/bin/python}
PY_ARM=$ROOT/usr/bin/python3.11

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq qemu-user-static debootstrap
fi

if [ ! -x "$PY_ARM" ]; then
    # --foreign: download and unpack without running arm64 code; the Python packages are unpacked by hand
    # (configuring them would need binfmt_misc, which a container may not have; qemu is called directly instead).
    debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3.11-minimal,libpython3.11-stdlib,libstdc++6,zlib1g,libffi8 bookworm "$ROOT"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
fi

# The same versions as the host venv, as aarch64 wheels.
pins=$("$HOST_PY" -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in
    ("numpy", "numba", "llvmlite", "gguf", "pytest")))')
if [ ! -f "$ROOT/site/.pins" ] || [ "$(cat "$ROOT/site/.pins")" != "$pins" ]; then
    rm -rf "$ROOT/site"
    # shellcheck disable=SC2086
    "$HOST_PY" -m pip install -q --target "$ROOT/site" --platform manylinux_2_28_aarch64 --only-binary=:all: \
        --python-version 3.11 --implementation cp $pins
    echo "$pins" > "$ROOT/site/.pins"
fi

cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
run_arm() {
    NUMBA_CACHE_DIR=$cache PYTHONPATH="$ROOT/site:$REPO/src" PYTHONDONTWRITEBYTECODE=1 \
        qemu-aarch64-static -L "$ROOT" "$PY_ARM" "$@"
}

cd "$REPO"
run_arm -c 'import platform; from ossrt.engine import simd
print("emulated:", platform.machine(), "simd.ISA:", simd.ISA); assert simd.ISA == "aarch64"'
if [ $# -eq 0 ]; then
    set -- tests/test_simd_portable.py tests/test_kernels.py
fi
run_arm -m pytest -q -p no:cacheprovider "$@"
