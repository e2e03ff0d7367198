"""The CUDA backend: the forward pass of `engine.model.Transformer` on an NVIDIA GPU (`CudaOps`), with CuPy arrays and
numba.cuda kernels.

Importing this package loads neither CuPy nor numba.cuda (the CPU path never does): `available()` probes for them
and `CudaOps` imports them on first use. Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, as in the tests)
`CudaOps` runs the same kernels on NumPy arrays; `available()` reports only a real GPU.
"""

from __future__ import annotations

import importlib

from ...errors import DeviceError

INSTALL = "pip install 'ossrt[cuda12]' (or 'ossrt[cuda13]' for CUDA 13)"


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
    """Whether a real CUDA device can run the backend (CuPy, numba-cuda, a device). Never raises."""
    try:
        check()
        from . import device as dev

        return not dev.SIMULATOR
    except Exception:  # noqa: BLE001 - a broken CUDA installation is simply not available
        return False


def __getattr__(name: str):
    """`CudaOps`, imported on first use (DeviceError without numba-cuda)."""
    if name != "CudaOps":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_numba_cuda()
    from .ops import CudaOps

    return CudaOps
