#!/usr/bin/env bash
# Build llama.cpp the way its Python users get it: llama-cpp-python from source, with llama.cpp's default
# GGML_NATIVE=ON (all ISA extensions of this CPU), in its own venv outside the repository.
#
#   benchmarks/build_llamacpp.sh [VENV] [--no-amx]
#
# VENV defaults to /work/llama-venv (what bench_vs_llamacpp.py looks for). --no-amx is for machines where llama.cpp's
# AMX path crashes: a CPU that reports amx_tile/amx_int8 under a kernel or sandbox that does not really enable the
# tile state (the stock native build then dies with a general protection fault at `ldtilecfg` in
# ggml_backend_amx_mul_mat on its first batch). With GGML_NATIVE=ON, ggml ignores -DGGML_AMX_*=OFF (those options
# only pick flags for non-native builds; AMX comes from -march=native's __AMX_INT8__), so --no-amx also passes
# -mno-amx-* to the compiler, which takes precedence over -march=native. Everything else stays native, and
# llama.cpp's repacked weights (CPU_REPACK, AVX-512) stay on.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36   # pinned: the version issue 15's numbers were measured with
VENV=/work/llama-venv
EXTRA=""
for arg in "$@"; do
  case "$arg" in
    --no-amx) EXTRA="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
              export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
              export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
    -*) echo "unknown option: $arg" >&2; exit 2 ;;
    *) VENV="$arg" ;;
  esac
done

PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

# GGML_NATIVE=ON is llama.cpp's default; it is spelled out so the build log shows it.
export CMAKE_ARGS="-DGGML_NATIVE=ON $EXTRA"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION in $VENV with CMAKE_ARGS='$CMAKE_ARGS'" \
  "CFLAGS='${CFLAGS:-}' CXXFLAGS='${CXXFLAGS:-}'"
"$VENV/bin/python" -m pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
# What was built, kept beside the venv for bench_vs_llamacpp.py to print.
{
  echo "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION built from source $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "CMAKE_ARGS=$CMAKE_ARGS"
  echo "CFLAGS=${CFLAGS:-} CXXFLAGS=${CXXFLAGS:-}"
  echo "compiler: $(${CXX:-c++} --version | head -1)"
} > "$VENV/llamacpp-build.txt"
cat "$VENV/llamacpp-build.txt"
"$VENV/bin/python" - <<'PY'
import llama_cpp
print("system_info:", llama_cpp.llama_print_system_info().decode())
PY
