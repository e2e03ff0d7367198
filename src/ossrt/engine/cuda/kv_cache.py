"""The KV cache of the CUDA backend: `engine.kv_cache.KVCache` with its arrays on the device.

Everything but where the arrays live is the CPU cache's: layouts and storage types (f32, f16 bits, q8_0 int8 with
float32 scales), rings of window + chunk - 1 slots in the sliding layers, `length`, truncation, snapshots. The
kernels store into it and attend over it (`kernels.kv_store`, `kernels.attend`). Snapshots copy the rings on the
device; a restore copies them back in place, so the arrays a recorded decode step points at stay valid.
"""

from __future__ import annotations

from typing import Callable, ContextManager

from ...format.config import ModelConfig
from ..kv_cache import CHUNK, KVCache, KVSnapshot
from . import device


class DeviceKVCache(KVCache):
    """A `KVCache` on the device. `context()` is the backend's (its device and stream): the cache's own copies run
    in it, ordered with the forward passes. `decode_step` holds the cache's recorded decode step
    (`graph.DecodeStep`)."""

    def __init__(self, config: ModelConfig, context_length: int, kv_type: str,
                 context: Callable[[], ContextManager], chunk: int = CHUNK):
        self._context = context
        super().__init__(config, context_length, kv_type, chunk)
        # KVCache allocates its layers on the host, zeroed, so their pages were never touched: swapped for device
        # arrays of the same shapes and types.
        with context():
            for layer in self.layers:
                for name in ("keys", "values", "key_scales", "value_scales"):
                    host = getattr(layer, name)
                    if host is not None:
                        setattr(layer, name, device.zeros(host.shape, host.dtype))
        self.decode_step = None

    def snapshot(self) -> KVSnapshot:
        with self._context():
            return super().snapshot()

    def restore(self, snap: KVSnapshot) -> None:
        with self._context():
            super().restore(snap)
