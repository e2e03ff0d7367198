"""Where the CUDA backend's arrays live and how its kernels are launched: the one place that knows whether a real GPU
or numba's CUDA simulator runs them.

On a GPU, device arrays are CuPy arrays (numba.cuda kernels take them through `__cuda_array_interface__`). Under the
simulator (`NUMBA_ENABLE_CUDASIM=1`, set by the tests before numba.cuda is imported) NumPy stands in for CuPy and
every CUDA thread is a Python thread, so launches are tiny there. CuPy is imported only when it is first needed on a
GPU, so importing this module never needs CUDA.

Two device primitives differ between the two: the warp shuffle (the simulator has none) and the bit cast from int32
to float32 (libdevice, which the simulator lacks). Everything else runs the same code in both.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
from numba import cuda, float32
from numba.cuda.core import config as _cuda_config

SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
# Kernels run on CuPy's current stream (`stream()`), in order with CuPy's own work, so numba need not synchronize
# that stream before each launch (its default for `__cuda_array_interface__` arrays); inside a CUDA graph capture
# such a synchronization would be an error.
_cuda_config.CUDA_ARRAY_INTERFACE_SYNC = 0

WARP = 32
FULL_MASK = 0xFFFFFFFF  # every lane of the warp takes part in a shuffle
GPU_THREADS = 128  # threads per block on a GPU: 4 warps, small enough for several resident blocks per SM
GPU_BLOCKS_PER_SM = 16  # 16 blocks x 128 threads = 2048, the resident-thread limit of an SM since Volta
SIM_THREADS = 32  # one warp: the simulator runs a Python thread per CUDA thread (~1 ms each)
MAX_THREADS = 1024  # CUDA's largest block, and the size of the simulated shuffle exchange


@dataclass(frozen=True)
class Launch:
    """A launch configuration. `group` lanes (a power of two up to a warp) work on one item - a weight row, a
    (query, head) pair - and combine their partial results with shuffles; `threads // group` items run per block,
    and every kernel strides over its items, so any positive sizes give the same result."""

    blocks: int
    threads: int
    group: int

    def __post_init__(self):
        if self.blocks < 1 or self.threads < 1 or self.threads % WARP or self.threads > MAX_THREADS:
            raise ValueError(f"a launch needs blocks >= 1 and whole warps of threads (at most {MAX_THREADS}), "
                             f"got {self.blocks} x {self.threads}")
        if self.group not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"a lane group is a power of two up to {WARP}, got {self.group}")

    @property
    def items_per_block(self) -> int:
        return self.threads // self.group


@cache
def _sm_count() -> int:
    return _array_module().cuda.Device().attributes["MultiProcessorCount"]


def launch(items: int, group: int = 1) -> Launch:
    """The launch for `items` work items of `group` lanes each. GPU: blocks of 128 threads, as many as needed up to
    what the device holds resident at once (the kernels' stride loops do the rest). Simulator: one warp, one lane
    per item, so no shuffles and no barriers are simulated (tests choose other launches explicitly)."""
    if SIMULATOR:
        return Launch(1, SIM_THREADS, 1)
    per_block = GPU_THREADS // group
    blocks = min(max(1, -(-items // per_block)), _sm_count() * GPU_BLOCKS_PER_SM)
    return Launch(blocks, GPU_THREADS, group)


# --- arrays ---------------------------------------------------------------------------------------------------------
@cache
def _array_module():
    if SIMULATOR:
        return np
    import cupy

    return cupy


def __getattr__(name: str):
    """`xp`, the array module of device arrays: CuPy on a GPU, NumPy under the simulator (imported on first use)."""
    if name == "xp":
        return _array_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stream():
    """The stream kernels launch on: CuPy's current one (the backend's stream, which a decode step's graph capture
    records), as a numba stream; 0 (the default) under the simulator."""
    if SIMULATOR:
        return 0
    return _numba_stream(_array_module().cuda.get_current_stream().ptr)


@cache
def _numba_stream(ptr: int):
    return cuda.external_stream(ptr)


def to_device(a, dtype=None):
    """A host (or device) array as a contiguous device array."""
    return _array_module().ascontiguousarray(_array_module().asarray(a, dtype=dtype))


def to_host(a) -> np.ndarray:
    """A device array as a NumPy array (a copy on a GPU)."""
    return np.asarray(a) if SIMULATOR else _array_module().asnumpy(a)


def zeros(shape, dtype=np.float32):
    return _array_module().zeros(shape, dtype=dtype)


def empty(shape, dtype=np.float32):
    return _array_module().empty(shape, dtype=dtype)


def is_device_array(a) -> bool:
    """Whether `a` is an array of the device's kind (under the simulator every NumPy array is)."""
    return isinstance(a, np.ndarray) if SIMULATOR else hasattr(a, "__cuda_array_interface__")


@cache
def zero_index():
    """A device int32 [1] holding 0: the default `start_ref` of kernels whose start position may come from device
    memory (the decode step of a CUDA graph reads its position there)."""
    return zeros(1, np.int32)


# The simulator runs each CUDA thread of a block as a Python thread, polled by a busy main thread, so its speed rests on
# how often the GIL changes hands: shuffles (two barriers each) want it handed round fast, every thread reaching the
# barrier in turn; barrier-free launches (every default launch: one lane per item) want each thread to run its items
# in one go, and slow down up to 50x on a two-core machine when switched every 0.1 ms or even every 5 ms.
BARRIER_SWITCH_INTERVAL = 1e-4
FREE_RUNNING_SWITCH_INTERVAL = 0.05


@contextmanager
def switch_interval(seconds: float):
    """Under the simulator, the GIL switch interval `seconds` (BARRIER_SWITCH_INTERVAL or
    FREE_RUNNING_SWITCH_INTERVAL) for the duration. A no-op on a GPU."""
    if not SIMULATOR:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


# --- device primitives ----------------------------------------------------------------------------------------------
if SIMULATOR:
    _first_use = threading.Lock()  # the simulator creates a shared array on its first use, unguarded

    @cuda.jit(device=True)
    def shfl_xor(value, lane_mask):
        """The float32 of lane `lane ^ lane_mask`, exchanged through shared memory between two barriers: the block
        (not just the warp) must call it together, which the kernels' block-uniform loops guarantee."""
        with _first_use:
            lanes = cuda.shared.array(MAX_THREADS, float32)
        lane = cuda.threadIdx.x
        lanes[lane] = value
        cuda.syncthreads()
        other = lanes[lane ^ lane_mask]
        cuda.syncthreads()
        return other

    @cuda.jit(device=True)
    def bits_to_float(bits):
        """The float32 whose bit pattern is the int32 `bits`."""
        return np.int32(bits).view(np.float32)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def shfl_xor(value, lane_mask):
        return cuda.shfl_xor_sync(FULL_MASK, value, lane_mask)

    @cuda.jit(device=True, inline=True)
    def bits_to_float(bits):
        return libdevice.int_as_float(bits)
