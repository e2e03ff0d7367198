"""`CudaOps`: the operations `engine.model.Transformer` calls, on a CUDA device (CuPy arrays; NumPy under numba's CUDA
simulator), with the kernels of `kernels`.

Weights go to the device as the file stores them (MXFP4 experts stay 4-bit, Q8_0 8-bit, BF16/F16 16-bit), one
tensor at a time from the memory map. A decode step (one token) uses the matrix-vector kernels over the packed
weights and the fused MoE kernel, which reads the router's expert ids on the device; it is recorded as a CUDA graph
per cache and replayed (`graph.DecodeStep`). A prefill step dequantizes weights to float32, a tile of rows at a
time, and multiplies with `xp.matmul` (cuBLAS on a GPU), grouping the tokens by expert on the host. Activations and
sums are float32, as on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import numpy as np

from ...format.config import ModelConfig
from ...format.modelfile import Tensor
from ..kv_cache import CHUNK, LayerKV
from ..model import Cancelled
from . import LINEAR_TILE_BYTES, check, kernels
from . import device as dev
from .device import SIMULATOR, to_device, to_host
from .graph import DecodeStep
from .kv_cache import DeviceKVCache


class CudaOps:
    """Operations on device arrays of CUDA device `device` (DeviceError naming what is missing if it cannot be
    used)."""

    threads = None  # the kernels run on the device: no CPU thread count
    few_tokens = 1  # passes of several tokens take the prefill kernels: drafted tokens are not checked here

    def __init__(self, device: int = 0):
        check(device)
        self.xp = dev.xp
        self.device = device
        if not SIMULATOR:
            with self.xp.cuda.Device(device):
                self._stream = self.xp.cuda.Stream(non_blocking=True)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """CuPy's current device and stream are the backend's inside (they are per thread, and restored after), and
        numba's current device: what runs here is ordered on the one stream, which a CUDA graph can record (the
        legacy default stream cannot be captured)."""
        if SIMULATOR:
            yield
            return
        from numba import cuda

        with self.xp.cuda.Device(self.device), self._stream:
            cuda.select_device(self.device)
            yield

    def array(self, a: np.ndarray):
        """A copy on the device (under the simulator a copy in RAM, writable as device memory is)."""
        with self.context():
            return self.xp.array(a)

    def upload(self, tensor: Tensor) -> Tensor:
        """The tensor with its data copied to the device as stored."""
        return dataclasses.replace(tensor, data=self.array(tensor.data))

    def new_cache(self, config: ModelConfig, context_length: int, kv_type: str,
                  chunk: int = CHUNK) -> DeviceKVCache:
        return DeviceKVCache(config, context_length, kv_type, self.context, chunk)

    def step(self, blocks: Callable, tokens: np.ndarray, start: int, cache: DeviceKVCache,
             should_stop: Callable[[], bool] | None):
        """A single token goes through the cache's recorded decode step (`should_stop` asked once, before it);
        more tokens through `blocks` directly."""
        if len(tokens) == 1:
            if should_stop is not None and should_stop():
                raise Cancelled
            if cache.decode_step is None:
                cache.decode_step = DecodeStep(blocks, cache)
            return cache.decode_step(int(tokens[0]), start)
        positions = to_device(np.arange(start, start + len(tokens)), np.int32)
        return blocks(to_device(tokens, np.int32), positions, cache, should_stop)

    def linear_many(self, ws: list, x, biases: list) -> list:
        """Each of `linear`: one graph records the kernels one after another."""
        return [self.linear(w, x, b) for w, b in zip(ws, biases)]

    def embed(self, w: Tensor, tokens):
        return kernels.embed(w, tokens)

    def linear(self, w: Tensor, x, bias=None):
        if x.shape[0] == 1:
            return kernels.matvec(w, x[0], bias=bias)[None]
        n_out, n_in = w.shape
        out = self.xp.empty((x.shape[0], n_out), dtype=np.float32)
        tile = max(1, LINEAR_TILE_BYTES // (4 * n_in))
        for r0 in range(0, n_out, tile):
            n = min(tile, n_out - r0)
            out[:, r0:r0 + n] = x @ kernels.dequantize(w, first_row=r0, n_rows=n).T
        if bias is not None:
            out += bias
        return out

    def rms_norm(self, x, gain, eps: float):
        return kernels.rms_norm(x, gain, eps)

    def rotation(self, positions, inv_freq, concentration: float):
        """The kernel computes each position's angles itself, from the first position in device memory."""
        return positions[:1], inv_freq, concentration

    def rope(self, q, k, rotation):
        start, inv_freq, concentration = rotation
        kernels.rope(q, k, inv_freq, concentration, start)  # in place
        return q, k

    def router(self, logits, k: int):
        return kernels.router(logits, k)

    def moe(self, gate: Tensor, up: Tensor, down: Tensor, gate_b, up_b, down_b, x, ids, weights, alpha: float,
            limit: float):
        if x.shape[0] == 1:
            return kernels.moe_decode(gate, up, down, gate_b, up_b, down_b, x[0], ids[0], weights[0], alpha=alpha,
                                      limit=limit)[None]
        T, k = ids.shape
        _, n_ff, n_embd = gate.shape
        chosen = to_host(ids).reshape(-1)  # assignment a: token a // k; grouping them syncs with the device once
        out = self.xp.zeros((T, n_embd), dtype=np.float32)
        for e in np.unique(chosen):
            assignments = np.flatnonzero(chosen == e)
            rows = to_device(assignments // k)  # distinct: a token picks an expert at most once
            xe = x[rows]
            g = xe @ kernels.dequantize(gate, first_row=e * n_ff, n_rows=n_ff).T
            u = xe @ kernels.dequantize(up, first_row=e * n_ff, n_rows=n_ff).T
            act = kernels.swiglu(g, u, gate_b[e], up_b[e], alpha=alpha, limit=limit)
            y = act @ kernels.dequantize(down, first_row=e * n_embd, n_rows=n_embd).T + down_b[e]
            out[rows] += weights.reshape(-1)[to_device(assignments)][:, None] * y
        return out

    def store(self, kv: LayerKV, positions, k, v) -> None:
        kernels.kv_store(kv.keys, kv.values, kv.key_scales, kv.value_scales, k, v, positions[:1])

    def attend(self, q, kv: LayerKV, positions, sinks, scale: float):
        return kernels.attend(q, kv.keys, kv.values, kv.key_scales, kv.value_scales, positions[:1], kv.window,
                              sinks, scale)

    def to_host(self, x) -> np.ndarray:
        return to_host(x)
