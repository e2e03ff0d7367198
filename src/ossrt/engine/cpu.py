"""The CPU backend of the forward pass: `CpuOps`, the operations `engine.model.Transformer` calls, on NumPy arrays.

Weights stay in the memory-mapped file: `kernels` does the weight math (Numba kernels that decode the file's
blocks as they go), `attention` the attention over a `kv_cache.KVCache`, `small_ops` RMSNorm, RoPE and the
router's top-k; the rest are NumPy expressions in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from typing import Callable, Iterator

import numpy as np

from . import kernels, small_ops
from .attention import attend
from .expert_cache import KINDS, ExpertCache
from .kv_cache import CHUNK, KVCache, LayerKV
from ..format.config import ModelConfig


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have the C library keep the memory a forward pass frees for the next pass rather than give it back to the OS:
    blocks up to 32 MiB (its most) from the heap instead of mappings of their own, and no trimming of the heap below
    1 GiB free. A pass allocates its activations anew (some 300 MB for a 60-token prompt on the 20b). Given back,
    on a VM they are soon reported free to the host (virtio-balloon), and then every page costs a fault in the
    host when touched again: a 60-token prompt after a few seconds' pause took 1.22-1.34 s instead of 0.94-1.10
    (AMD EPYC VM). The process keeps its largest pass's working memory. True where glibc took both settings."""
    name = ctypes.util.find_library("c") if os.name == "posix" else None
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class CpuOps:
    """Operations on NumPy arrays with Numba kernels running on `threads` cores (None: all). With
    `int8_activations` (default) prompts run through integer matmuls where the CPU has VNNI (`kernels.matmul`):
    about three times the float32 rate, at an error about that of the q8_0 file's rounding of the weights; so do
    decode's MoE experts (`kernels.moe`: 1.4× the float32 kernel's rate on the 20b) and Q8_0 attention projections
    and unembedding (`kernels.linear`, `linear_many`: 1.0-1.5×), while the router stays float32. False keeps
    float32 throughout. With an `ExpertCache`, the experts come from its pools (read from the file as needed)
    instead of the memory map."""

    few_tokens = kernels.FEW_TOKENS

    def __init__(self, threads: int | None = None, int8_activations: bool = True,
                 experts: ExpertCache | None = None):
        self.threads = kernels.set_num_threads(threads)
        self.int8_activations = int8_activations
        keep_freed_memory()
        self.experts = experts

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Numba's thread count is per thread: applied in whichever thread runs a forward pass (a server's request
        threads, an app's worker threads)."""
        kernels.set_num_threads(self.threads)
        yield

    def array(self, a: np.ndarray) -> np.ndarray:
        return a

    def upload(self, tensor):
        """Weights are used where they lie in the memory map."""
        return tensor

    def new_cache(self, config: ModelConfig, context_length: int, kv_type: str, chunk: int = CHUNK) -> KVCache:
        return KVCache(config, context_length, kv_type, chunk)

    def step(self, blocks: Callable, tokens: np.ndarray, start: int, cache: KVCache,
             should_stop: Callable[[], bool] | None) -> np.ndarray:
        """`blocks(tokens, positions, cache, should_stop)` for tokens at positions start, start + 1, ..."""
        return blocks(tokens, np.arange(start, start + len(tokens)), cache, should_stop)

    def embed(self, w, tokens: np.ndarray) -> np.ndarray:
        return kernels.dequantize(w, rows=tokens)

    def linear(self, w, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        return kernels.linear(w, x, bias, int8_activations=self.int8_activations)

    def linear_many(self, ws: list, x: np.ndarray, biases: list) -> list[np.ndarray]:
        return kernels.linear_many(ws, x, biases, int8_activations=self.int8_activations)

    def rms_norm(self, x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
        return small_ops.rms_norm(x, gain, eps)

    def rotation(self, positions: np.ndarray, inv_freq: np.ndarray,
                 concentration: float) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [T, d/2] of the positions' angles (float64, then float32), times the concentration. A few
        positions are taken one at a time, as a pass of each alone takes it (NumPy's vector code may round an element
        differently by where it falls in the array)."""
        angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
        if len(positions) <= self.few_tokens:
            return tuple(np.stack([(f(row) * concentration).astype(np.float32) for row in angles])
                         for f in (np.cos, np.sin))
        return ((np.cos(angles) * concentration).astype(np.float32),
                (np.sin(angles) * concentration).astype(np.float32))

    def rope(self, q: np.ndarray, k: np.ndarray,
             rotation: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = rotation
        return small_ops.rope(q, cos, sin), small_ops.rope(k, cos, sin)

    def router(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return small_ops.router(logits, k)

    def moe(self, gate, up, down, gate_b: np.ndarray, up_b: np.ndarray, down_b: np.ndarray, x: np.ndarray,
            ids: np.ndarray, weights: np.ndarray, alpha: float, limit: float) -> np.ndarray:
        if self.experts is not None:
            layer = int(gate.name.split(".")[1])  # names are blk.N.ffn_*_exps.weight
            ids = self.experts.slots(layer, ids)
            self.experts.prefetch_next(layer, x)  # the disk reads ahead while this layer computes
            gate, up, down = (self.experts.pool_tensors[kind] for kind in KINDS)
            gate_b, up_b, down_b = (self.experts.bias_pools[kind] for kind in KINDS)
        return kernels.moe(gate, up, down, gate_b, up_b, down_b, x, ids, weights, alpha=alpha, limit=limit,
                           int8_activations=self.int8_activations)

    def store(self, kv: LayerKV, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        kv.store(int(positions[0]), k, v)

    def attend(self, q: np.ndarray, kv: LayerKV, positions: np.ndarray, sinks: np.ndarray,
               scale: float) -> np.ndarray:
        return attend(q, kv, int(positions[0]), sinks, scale)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()

