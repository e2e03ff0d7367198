#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a GPU machine that has no network: download them here, copy the source
# tree with them, and put them on PYTHONPATH there (no install step).
#
#     benchmarks/gpu_wheels.sh [DIR]       # download into DIR (default: benchmarks/wheels/), print the PYTHONPATH
#     benchmarks/gpu_wheels.sh --list      # the wheels, one requirement a line; nothing is downloaded
#
# The GPU machine (issue 13) has Python 3.12 with numpy, numba, numba-cuda, cupy, safetensors, tiktoken (and so
# requests and regex), click, tqdm and torch. Of ossrt's dependencies only gguf is missing, and `import gguf` imports
# yaml (gguf/metadata.py); gguf's other requirements are there (numpy, tqdm, requests: imported only to fetch remote
# files, never by ossrt). sentencepiece and mistral_common are optional imports inside gguf and not needed.
#
# A wheel is a zip file, and Python imports pure-Python packages from a zip file named on PYTHONPATH. PyYAML has
# no pure-Python wheel: its wheels carry an optional C extension, which cannot load from a zip, so yaml falls back
# to its pure-Python code (yaml.__with_libyaml__ is False); any platform's PyYAML wheel would do, the x86_64 one is
# taken. Total: about 1 MB, well inside the 64 MiB the source tree may take.
#
# CUDA 12 or 13: the check imports `cupy`, which cupy-cuda12x and cupy-cuda13x both provide, and numba-cuda, so it
# runs with whichever the machine has; neither travels as a wheel (CuPy's wheels are ~100 MB and not pure Python).
# A CUDA 12 machine needs `pip install "ossrt[cuda12]"` (cupy-cuda12x, numba-cuda[cu12]) done before it goes
# offline; CUDA 13 likewise with ossrt[cuda13].
set -euo pipefail

# Pinned to the versions CI tests with; tests/test_gpu_check.py checks the list against gguf's requirements.
WHEELS=(
    "gguf==0.19.0"
    "PyYAML==6.0.3"
)
PYTHON_VERSION=3.12  # the GPU machine's Python

if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${WHEELS[@]}"
    exit 0
fi
if [[ "${1:-}" == -* ]]; then
    echo "usage: $0 [DIR] | --list" >&2
    exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/benchmarks/wheels}"
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
    --python-version "$PYTHON_VERSION" --implementation cp --abi "cp${PYTHON_VERSION/./}" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${WHEELS[@]}"

# The PYTHONPATH line, relative to the source tree when DIR is inside it (the tree is what travels).
path="src"
for requirement in "${WHEELS[@]}"; do
    name="${requirement%%==*}"
    version="${requirement##*==}"
    # Wheel file names use the normalised project name: lower case for PyYAML, underscores for dashes.
    pattern="$(echo "$name" | tr 'A-Z-' 'a-z_')-${version}-*.whl"
    wheel="$(cd "$dir" && ls $pattern | head -n 1)"
    if [[ -z "$wheel" ]]; then
        echo "error: no wheel for $requirement in $dir" >&2
        exit 1
    fi
    full="$(cd "$dir" && pwd)/$wheel"
    path="$path:${full#"$root"/}"
done
echo "wheels in $dir ($(du -sh "$dir" | cut -f1)). On the GPU machine, from the source tree:"
echo "    PYTHONPATH=$path python benchmarks/gpu_check.py"
