#!/usr/bin/env bash
# Build llama.cpp the way its Python users get it: llama-cpp-python from source, with llama.cpp's default
# GGML_NATIVE=ON (all ISA extensions of this CPU), in its own venv outside the repository.
#
#   benchmarks/build_llamacpp.sh [VENV] [--no-amx]
#
# VENV defaults to /work/llama-venv (what bench_vs_llamacpp.py looks for). --no-amx adds only
# -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF, for CPUs where llama.cpp's AMX path crashes.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36   # pinned: the version issue 15's numbers were measured with
VENV=/work/llama-venv
EXTRA=""
for arg in "$@"; do
  case "$arg" in
    --no-amx) EXTRA="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" ;;
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
echo "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION in $VENV with CMAKE_ARGS='$CMAKE_ARGS'"
"$VENV/bin/python" -m pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
# numpy is needed by llama-cpp-python at import; it comes as a dependency.

"$VENV/bin/python" - <<'PY'
import llama_cpp
print("llama-cpp-python", llama_cpp.__version__)
print("system_info:", llama_cpp.llama_print_system_info().decode())
PY
echo "CMAKE_ARGS used: $CMAKE_ARGS"
