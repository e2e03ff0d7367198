"""The CUDA backend: the forward pass of `engine.model.Transformer` on an NVIDIA GPU (`CudaOps`), with CuPy arrays and
numba.cuda kernels.

Importing this package loads neither CuPy nor numba.cuda (the CPU path never does): `available()` probes for them
and `CudaOps` imports them on first use. Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, as in the tests)
`CudaOps` runs the same kernels on NumPy arrays; `available()` reports only a real GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING

from ...errors import DeviceError

if TYPE_CHECKING:
    from ...format.config import ModelConfig

INSTALL = "pip install 'ossrt[cuda12]' (or 'ossrt[cuda13]' for CUDA 13)"
LINEAR_TILE_BYTES = 64 << 20  # float32 weights a prefill product dequantizes at a time (the unembedding is 2.3 GB)


def _import_numba_cuda() -> None:
    try:
        importlib.import_module("numba.cuda")
    except ImportError as e:
        raise DeviceError(f"numba-cuda is not installed ({e}): {INSTALL}") from None


def check(device: int = 0) -> None:
    """DeviceError naming what CUDA device `device` lacks: numba-cuda, CuPy, a driver, the device. Under the
    simulator only numba-cuda is needed."""
    _import_numba_cuda()
    from . import device as dev

    if dev.SIMULATOR:
        return
    try:
        import cupy
    except ImportError:
        raise DeviceError(f"CuPy is not installed: {INSTALL}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy's CUDARuntimeError: no driver, or a driver too old for CuPy's CUDA
        raise DeviceError(f"no CUDA device found ({e})") from None
    if count == 0:
        raise DeviceError("no CUDA device found")
    if not 0 <= device < count:
        raise DeviceError(f"CUDA device {device} not found: devices are numbered 0..{count - 1}")
    from numba import cuda

    if not cuda.is_available():
        raise DeviceError("numba-cuda cannot use the CUDA driver (see `python -c 'from numba import cuda; "
                          "cuda.detect()'`)")


def available() -> bool:
    """Whether a real CUDA device can run the backend (CuPy, numba-cuda, a device). Never raises; without CuPy it
    answers at once, importing nothing."""
    if "cupy" not in sys.modules and importlib.util.find_spec("cupy") is None:
        return False
    try:
        check()
        from . import device as dev

        return not dev.SIMULATOR
    except Exception:  # noqa: BLE001 - a broken CUDA installation is simply not available
        return False


def workspace_bytes(config: "ModelConfig", chunk: int) -> int:
    """What the backend allocates beside the weights and the KV cache, at most, while prefilling `chunk` tokens: the
    chunk's float32 activations (residual stream, q/k/v, attention output, router, the experts' hidden values), a
    tile of dequantized float32 weights, one expert's gate, up and down matrices in float32, a row of logits, and
    room for CuPy's pool rounding and a decode step's graph. `Model.logits` (every position's logits) needs
    chunk × vocabulary × 4 bytes more. An estimate: a real device may differ by tens of MB."""
    c = config
    per_token = 4 * (3 * c.n_embd + 2 * c.q_dim + 2 * c.kv_dim + c.n_expert + 2 * c.n_expert_used * c.n_ff_exp)
    one_expert = 4 * 3 * c.n_ff_exp * c.n_embd
    return chunk * per_token + LINEAR_TILE_BYTES + one_expert + 4 * c.n_vocab + (96 << 20)


def __getattr__(name: str):
    """`CudaOps`, imported on first use (DeviceError without numba-cuda)."""
    if name != "CudaOps":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_numba_cuda()
    from .ops import CudaOps

    return CudaOps
