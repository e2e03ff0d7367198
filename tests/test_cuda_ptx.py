"""Every CUDA kernel compiles to PTX for the GPUs people run gpt-oss on (no GPU needed: NVVM from numba-cuda's cu13
extra). The simulator runs the kernels as Python and so cannot see what only the compiler sees: types it cannot
infer, Python features CUDA lacks, float64 arithmetic slipping in (1/64 of the float32 rate on consumer cards).

The compiler runs in a child process: this one has numba.cuda on its simulator (tests/conftest.py)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="NVVM wheels exist for Linux only")

# Ampere (A100, sm_80), the 16 GB consumer cards (sm_86/sm_89), Hopper (H100/H200, sm_90).
TARGETS = [(8, 0), (8, 6), (8, 9), (9, 0)]
# Kernels allowed float64 instructions: RoPE computes cos/sin in float64 like the CPU's tables (a position up to
# 131072 times a frequency keeps its angle's low bits), once per (position, pair) for all heads.
FLOAT64_ALLOWED = {"rope"}


def compile_all(cc: tuple[int, int]) -> dict[str, list[str]]:
    """Child process: {kernel: the float64 instructions in its PTX}, for the argument types the launchers pass."""
    import re

    from gguf import GGMLQuantizationType as T
    from numba import cuda
    from numba import types as nt

    import numba.cuda.dispatcher as dispatcher

    class Target:  # device functions ask the current device for its compute capability: the one compiled for
        compute_capability = cc

    dispatcher.get_current_device = lambda: Target()

    from ossrt.engine.cuda import kernels as K

    u8_2, u8_3 = nt.uint8[:, ::1], nt.uint8[:, :, ::1]
    f16_2, f32_1, f32_2, f32_3 = nt.float16[:, ::1], nt.float32[::1], nt.float32[:, ::1], nt.float32[:, :, ::1]
    i64_1, i32_1, i32_2, f64_1 = nt.int64[::1], nt.int32[::1], nt.int32[:, ::1], nt.float64[::1]
    # (data, halves) as kernels._rows_2d gives them for each stored type
    stored = {T.MXFP4: (u8_2, u8_2), T.Q8_0: (u8_2, f16_2), T.BF16: (nt.uint16[:, ::1],) * 2,
              T.F16: (f16_2, f16_2), T.F32: (f32_2, f32_2)}
    kernels = {}
    for t, (w, h) in stored.items():
        for out in (f32_2, f16_2):
            kernels[f"dequantize {t.name} to {out.dtype}"] = K._DEQUANTIZE[t], (w, h, f32_1, i64_1, nt.int64, out)
        kernels[f"matvec {t.name}"] = K._MATVEC[t], (w, h, f32_1, f32_1, f32_1, nt.boolean, f32_1, nt.int64)
    kernels["moe gate/up"] = K._moe_gate_up, (u8_3, u8_3, f32_1, f32_2, f32_2, f32_1, i32_1, nt.float32, nt.float32,
                                              f32_2, nt.int64)
    kernels["moe down"] = K._moe_down, (u8_3, f32_1, f32_2, f32_2, i32_1, f32_1, nt.boolean, f32_1, nt.int64)
    kernels["swiglu"] = K._swiglu_rows, (f32_2, f32_2, f32_1, f32_1, nt.float32, nt.float32, f32_2)
    kernels["rms_norm"] = K._rms_norm, (f32_2, f32_1, nt.float32, f32_2, nt.int64)
    kernels["rope"] = K._rope, (f32_3, f32_3, f64_1, nt.float64, nt.int64, i32_1)
    kernels["router"] = K._router, (f32_2, i32_2, f32_2)
    for c in (nt.float32, nt.float16, nt.int8):
        cache = c[:, :, ::1]
        kernels[f"store {c}"] = K._store, (f32_3, f32_3, nt.int64, i32_1, cache, cache, f32_3, f32_3)
        kernels[f"attend {c}"] = K._attend, (f32_3, cache, f32_3, cache, f32_3, nt.int64, i32_1, nt.int64, f32_1,
                                             nt.float32, f32_3, nt.int64)
    found = {}
    for name, (kernel, signature) in kernels.items():
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
        assert ".entry" in ptx, name
        found[name] = sorted({m for m in re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx)
                              if not m.startswith(("ld.", "st.", "cvt."))})
    return found


@pytest.mark.parametrize("cc", TARGETS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_every_kernel_compiles_to_ptx(cc):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    run = subprocess.run([sys.executable, __file__, json.dumps(cc)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert len(found) == 3 * 5 + 6 + 2 * 3  # dequantize (two outputs) and matvec per type, six others, two per cache
    for name, ops in found.items():
        if name in FLOAT64_ALLOWED:
            assert ops, f"{name}: expected its float64 angle arithmetic in the PTX"
        else:
            assert ops == [], f"{name} computes in float64: {ops}"


if __name__ == "__main__":
    print(json.dumps(compile_all(tuple(json.loads(sys.argv[1])))))
